"""A 20-line tour of xqat: prepare -> train -> export -> parity -> EdgeTPU check, on the bundled digits."""
import xqat
from xqat.demo.data import digits
from xqat.demo.nets import DigitsCNN
from xqat.demo.training import accuracy, fit

data = digits(size=16)                                                    # bundled with scikit-learn
model = fit(DigitsCNN(), data.x_train, data.y_train, epochs=6, lr=3e-3)   # any float nn.Module
qat = xqat.prepare_qat(model, data.x_train[:1], xqat.QATConfig(freeze_bn_delay=200))
fit(qat, data.x_train, data.y_train, epochs=2, lr=5e-4)                   # your own training loop works too
print(f"float {accuracy(model, data.x_test, data.y_test):.4f}  QAT {accuracy(qat, data.x_test, data.y_test):.4f}")

report = xqat.export_tflite(qat, data.x_train[:1], "digits_int8.tflite")   # verified full-integer model
print(report.table())
print(xqat.parity(qat, "digits_int8.tflite", data.x_test, layerwise=True).table())
print(xqat.check_edgetpu("digits_int8.tflite").table())
xqat.save_qat(qat, "digits_qat.pt", (1, 1, 16, 16))                        # for `xqat export` / `xqat parity`
