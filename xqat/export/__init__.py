"""Export: folded eval graph -> Q/DQ ONNX -> onnx2tf -> TF FakeQuant graph -> full-integer TFLite."""
