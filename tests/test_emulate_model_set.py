"""The integer emulator on the exported model set: 0 mismatches against the interpreter on the same
backend, at the output and on every intermediate tensor, over 1000 random and real inputs ."""

import numpy as np
import pytest
import torch

import xqat
from tests.models import MODELS
from tests.tflite_oracle import BACKENDS, interpreter
from xqat.demo.data import digits
from xqat.verify.interpreter import quantize_input

N_INPUTS = 1000


@pytest.fixture(scope="module")
def images():
    """600 uniform random images and 400 real digits (upsampled to 16x16, grey -> RGB), NHWC float."""
    rand = torch.rand(600, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    real = digits(size=16).x_train[:400].expand(-1, 3, -1, -1)
    return torch.cat([rand, real]).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_emulator_is_bit_exact_on_every_tensor(exported, images, name, backend):
    _, path, _ = exported[name]
    raw = path.read_bytes()
    it = interpreter(raw, backend, preserve=True, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    codes = quantize_input(images, *inp["quantization"], inp["dtype"], backend)
    emu_out, emu_all = xqat.emulate(raw, [torch.from_numpy(codes)], backend=backend, intermediates=True)
    checked = [i for i in sorted(emu_all) if i != inp["index"]]
    assert out["index"] in checked and len(checked) >= 4
    mismatches = compared = 0
    for n in range(N_INPUTS):
        it.set_tensor(inp["index"], codes[n:n + 1])
        it.invoke()
        for idx in checked:
            want = it.get_tensor(idx)
            mismatches += int((want != emu_all[idx][n:n + 1].numpy()).sum())
            compared += want.size
    assert mismatches == 0, f"{mismatches} of {compared} elements differ on {name}/{backend}"
    assert compared >= N_INPUTS * sum(int(np.prod(emu_all[i].shape[1:])) for i in checked)
    assert np.array_equal(emu_out[0].numpy()[:5], emu_all[out["index"]].numpy()[:5])
