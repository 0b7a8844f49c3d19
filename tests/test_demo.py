"""The main job end to end (what `make demo` runs), on the bundled digits: QAT matches float, the int8
TFLite matches the QAT simulation, the run folder has every artefact."""

import json

from xqat.demo.pipeline import run_demo


def test_demo_end_to_end(tmp_path):
    res = run_demo(tmp_path, epochs=5, qat_epochs=2, verbose=False)
    acc = res.accuracy
    assert acc["float_torch"] > 0.9
    assert acc["qat_simulation"] >= acc["float_torch"] - 0.01
    assert abs(acc["int8_tflite"] - acc["qat_simulation"]) <= 0.01  # the device computes what training simulated
    assert "ptq_tflite" in acc
    assert acc["int8_emulated"] == acc["int8_tflite"]  # xqat.evaluate (batched emulator) = the interpreter
    assert res.parity["top1_agreement"] >= 0.99 and res.parity["max_abs"] <= 1
    assert acc["qat_exact"] == acc["int8_tflite"]  # exact numerics: the QAT model computes the device's model
    assert res.parity["exact_identical"] == 1.0 and res.parity["exact_top1_agreement"] == 1.0
    assert res.edgetpu["fully_mapped"]
    assert res.size_bytes["float_tflite"] > 2 * res.size_bytes["int8_tflite"]
    run = tmp_path / res.run_dir.split("/")[-1]
    for f in ("results.json", "summary.txt", "export_report.txt", "parity.txt", "parity_layers.png",
              "model_int8.tflite", "model_float.tflite", "model_ptq_int8.tflite", "qat.pt"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "results.json").read_text())
    assert saved["accuracy"] == acc
    assert "int8 TFLite (PTQ" in res.table() and "exact numerics (xnnpack)" in res.table()
