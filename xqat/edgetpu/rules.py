"""The EdgeTPU rule tables: every check with its checklist code, level, the ops it applies to and a fix.

Levels: FAIL = compiler 16 refuses the model; CPU = the op runs on the CPU; WARN = worth knowing
(docs/edgetpu.md, "Levels"). The checks live in `rules_tensor` (file, versions, tensors, whole model) and
`rules_ops` (the op table and each op's limits); `xqat.edgetpu.check` runs them and builds the segment model.
"""

from __future__ import annotations

from . import rules_ops as ops
from . import rules_tensor as tensor
from .rules_base import CPU, FAIL, WARN, ModelRule, OpRule, is_boundary_op, op_code
from .rules_ops import PAIR_EVIDENCE, SUPPORTED_OPS, UNVERIFIED_OPS
from .versions import COMPILER_TF, MAX_BUILTIN_CODE, RUNTIME_VERSIONS

__all__ = ["FAIL", "CPU", "WARN", "OpRule", "ModelRule", "OP_RULES", "MODEL_RULES", "RUNTIME_VERSIONS",
           "SUPPORTED_OPS", "UNVERIFIED_OPS", "PAIR_EVIDENCE", "COMPILER_TF", "MAX_BUILTIN_CODE", "is_boundary_op",
           "op_code"]

_XQAT_EXPORT = "export with `xqat export` (full int8, int8 I/O, static batch 1)"
_RESIZE = frozenset({"RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"})

OP_RULES: tuple[OpRule, ...] = (
    OpRule("F2", CPU, ops.CONTROL_FLOW, tensor.control_flow,
           "remove control flow and variables from the inference graph"),
    OpRule("F3", CPU, frozenset({"CUSTOM"}), tensor.custom,
           "expected for pre/post-processing ops; otherwise replace the op by builtin ops (no SELECT_TF_OPS)",
           note=PAIR_EVIDENCE["CUSTOM"]),
    OpRule("F4", FAIL, None, tensor.new_code, "replace the op by ReLU/ReLU6-family builtins that TF 2.5 already had"),
    OpRule("F5", FAIL, None, tensor.version_fail,
           "avoid the feature that bumps the version (grouped conv, fused activation on TransposeConv, "
           "per-channel QUANTIZE, int8 TILE, ...) or convert with TF <= 2.5"),
    OpRule("F5", WARN, None, tensor.version_uncertain,
           "avoid the feature that bumps the op version if the compile fails"),
    OpRule("T1", FAIL, tensor.CONV_LIKE, tensor.float_model,
           f"quantize every layer (no float fallback): {_XQAT_EXPORT}; converter ops TFLITE_BUILTINS_INT8"),
    OpRule("T1", CPU, None, tensor.not_8bit,
           "keep float/int16/int32/int64 computations out of the graph, or accept them on the CPU",
           note=PAIR_EVIDENCE["UNIDIRECTIONAL_SEQUENCE_LSTM"]),
    OpRule("T2", FAIL, None, tensor.quant_params,
           "give every 8-bit tensor one scale > 0 and an in-range zero point (per-tensor activations)"),
    OpRule("T3", FAIL, tensor.CONV_LIKE, tensor.weights_bias, "fold weights into constants: int8 filters, int32 bias"),
    OpRule("T4", FAIL, tensor.CONV_LIKE, tensor.per_axis,
           "quantize FC weights per tensor (`_experimental_disable_per_channel_quantization_for_dense_layers`); "
           "conv filters per output channel only"),
    OpRule("T6", CPU, None, tensor.rank_3, "reshape so at most the 3 innermost dims exceed 1 (no 5-D heads, batch 1)"),
    OpRule("T7", CPU, None, tensor.rank_4, "keep every tensor at rank <= 4"),
    OpRule("T8", FAIL, frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL",
                                  "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "TRANSPOSE_CONV"}),
           tensor.act_overflow, "recalibrate the layer's output range (it is far too narrow for its activation)"),
    OpRule("T8", WARN, None, tensor.tiny_scale, "check the layer's learned range; retrain or remove the dead layer"),
    OpRule("T9", WARN, None, tensor.large_activation, "use a smaller input or split the model (`edgetpu_compiler -d`)"),
    OpRule("T9", WARN, frozenset({"TRANSPOSE"}), tensor.input_transpose,
           "feed NHWC inputs (no NCHW transpose at the entry)"),
    OpRule("O1", CPU, None, ops.unsupported,
           "replace the layer by a supported one (ReLU/ReLU6/PReLU instead of LeakyReLU, HardSwish, GELU; "
           "no EXP/DIV/CAST/GATHER/ARG_MAX in the graph)", note=PAIR_EVIDENCE["TILE"]),
    OpRule("O1", WARN, frozenset(UNVERIFIED_OPS), ops.unverified, "verify with edgetpu_compiler -s; avoid if possible"),
    OpRule("O2", CPU, frozenset({"CONV_2D", "DEPTHWISE_CONV_2D"}), ops.dilation, "use the same dilation in x and y"),
    OpRule("O2", FAIL, frozenset({"CONV_2D"}), ops.grouped,
           "replace grouped conv by per-group convs + concat, or depthwise + 1x1 conv (onnx2tf -dgc)"),
    OpRule("O2", WARN, frozenset({"DEPTHWISE_CONV_2D"}), ops.depth_multiplier,
           "prefer depth multiplier 1 (depthwise then 1x1 conv)"),
    OpRule("O3", CPU, frozenset({"FULLY_CONNECTED"}), ops.fc_layout,
           "flatten to (1, features) before the Linear layer so its output is 1-D"),
    OpRule("O4", CPU, frozenset({"AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION"}), ops.fused_act,
           "apply the activation before the pooling/concat, or keep it unfused"),
    OpRule("O4", CPU, frozenset({"CONCATENATION"}), ops.concat_const,
           "do not concatenate constants (zero padding with one zero constant is the only exception)"),
    OpRule("O5", CPU, frozenset({"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "PAD", "PADV2", "MIRROR_PAD", "PACK",
                                 "SPLIT", "SPLIT_V"}), ops.axis_batch,
           "do not reduce/pad/pack/split the batch dim; reduce over channels only in multiples of 4"),
    OpRule("O6", CPU, frozenset({"SOFTMAX"}), ops.softmax,
           "apply softmax to a (1, N) tensor with N <= 16000, or move it to postprocessing"),
    OpRule("O7", CPU, frozenset({"SQUEEZE"}), ops.squeeze, "squeeze leading 1s only, or use a reshape"),
    OpRule("O7", CPU, frozenset({"STRIDED_SLICE"}), ops.strided_slice, "slice with stride 1 and plain begin/end"),
    OpRule("O8", CPU, _RESIZE, ops.resize_mode,
           "use nn.Upsample(mode='nearest') or bilinear without half-pixel centers (align_corners=True maps)",
           note=PAIR_EVIDENCE["RESIZE_BILINEAR"]),
    OpRule("O8", CPU, _RESIZE, ops.resize_from_1x1,
           "keep the broadcast of a 1x1 map off the TPU path: TILE version 1 (uint8) maps, but int8 TILE is "
           "version 3, which compiler 16 refuses (F5)",
           note=PAIR_EVIDENCE["RESIZE_BILINEAR"]),
    OpRule("O8", CPU, _RESIZE, ops.resize_size, "resize in postprocessing, or to a smaller output",
           note=PAIR_EVIDENCE["RESIZE_BILINEAR"]),
    OpRule("O9", CPU, frozenset({"PRELU"}), ops.prelu_alpha, "share PReLU alpha over H and W (one value per channel)"),
    OpRule("O9", FAIL, frozenset({"TRANSPOSE_CONV"}), ops.fused_act,
           "keep the activation after ConvTranspose unfused, or convert with TF <= 2.12 (TRANSPOSE_CONV v4)"),
    OpRule("O10", CPU, frozenset({"QUANTIZE", "DEQUANTIZE"}), tensor.io_conversion,
           "export with int8 (or uint8) inputs and outputs so the conversions map too"),
)

MODEL_RULES: tuple[ModelRule, ...] = (
    ModelRule("F1", FAIL, tensor.schema, "re-convert with a current TFLite converter"),
    ModelRule("F2", FAIL, tensor.subgraphs,
              "export a single feed-forward graph (no control flow, no extra signatures)"),
    ModelRule("F6", WARN, tensor.min_runtime, "the F5 findings say which op raised it"),
    ModelRule("T5", FAIL, tensor.dynamic, "fix every shape: batch 1 via set_shape / a concrete function"),
    ModelRule("T5", FAIL, tensor.io_batch, "export with batch 1"),
    ModelRule("O10", WARN, tensor.io_dtype,
              "export with int8 inputs and outputs (inference_input/output_type=tf.int8)"),
    ModelRule("P2", WARN, tensor.params,
              "shrink the model to stay within the on-chip cache, or accept slower streaming"),
)
