"""Compiler 16's TFLite op versions as data: which TF release first shipped each (op, version).

The EdgeTPU compiler 16.0 embeds a TF-2.5-era TFLite op resolver, so an op version first shipped after TF 2.5
makes the whole compile fail (docs/edgetpu.md, "Compiler and op versions"). The table is transcribed from TF's
tensorflow/lite/tools/versioning/runtime_version.cc; nothing here reads files or imports TensorFlow.
"""

from __future__ import annotations

__all__ = ["COMPILER_TF", "UNCERTAIN_TF", "MAX_BUILTIN_CODE", "RUNTIME_VERSIONS", "first_release", "format_release"]

# Op versions first shipped in TF 2.6 are uncertain (WARN); anything later makes the whole compile fail.
COMPILER_TF = (2, 5)
UNCERTAIN_TF = (2, 6)
MAX_BUILTIN_CODE = 139  # HASHTABLE_SIZE, the last op code of TF 2.5; GELU is 150

# First TF release whose TFLite runtime knows (op, version), transcribed from TF's
# tensorflow/lite/tools/versioning/runtime_version.cc (the TF 2.11-era map). Entry i is version i+1;
# "-" marks a version that never existed. A version past the end of a row appeared after that map, so it
# is newer than the compiler in any case.
_RUNTIME_TABLE = """
ABS 1.13 2.4 2.5 2.6
ADD 1.5 1.14 2.4 2.6
ADD_N 1.14
ARG_MAX 1.9 1.14 2.9
ARG_MIN 1.9 1.14 2.9
ASSIGN_VARIABLE 2.6
ATAN2 2.10
AVERAGE_POOL_2D 1.5 1.14 2.3
BATCH_MATMUL 2.3 2.3 2.4 2.5
BATCH_TO_SPACE_ND 1.6 1.14 2.3
BIDIRECTIONAL_SEQUENCE_LSTM 1.14 1.14 1.14
BIDIRECTIONAL_SEQUENCE_RNN 1.14 1.14 2.3
BROADCAST_ARGS 2.6
BROADCAST_TO - 2.5 2.5
BUCKETIZE 2.8
CALL_ONCE 2.5
CAST 1.5 2.7 2.8 2.9
CEIL 1.14
COMPLEX_ABS 2.5
CONCATENATION 1.5 1.14 2.3
CONV_2D 1.5 1.14 1.14 2.3 2.4 2.9
CONV_3D 2.5
CONV_3D_TRANSPOSE 2.6
COS 1.14
CUMSUM 2.4
DENSIFY 2.2
DEPTH_TO_SPACE 2.1 2.5
DEPTHWISE_CONV_2D 1.5 1.12 1.14 2.2 2.3 2.3
DEQUANTIZE 1.13 1.14 1.15 2.2 2.7
DIV 1.6 2.3
DYNAMIC_UPDATE_SLICE 2.9
ELU 1.14
EMBEDDING_LOOKUP 1.13 1.14 1.14
EMBEDDING_LOOKUP_SPARSE 1.5
EQUAL 1.14 1.14 2.3
EXP 1.7
EXPAND_DIMS 1.10
FAKE_QUANT 1.5 1.10
FILL 1.13 2.3 2.5
FLOOR 1.9
FLOOR_DIV 1.14 1.14
FLOOR_MOD 1.13
FULLY_CONNECTED 1.5 1.10 1.14 1.14 2.0 2.1 2.3 2.3 2.3
GATHER 1.6 1.14 1.15 2.4 2.5
GATHER_ND 1.14 2.3 2.5
GELU 2.9 2.9
GREATER 1.14 1.14
GREATER_EQUAL 1.14 1.14
HARD_SWISH 1.15
HASHTABLE 2.5
HASHTABLE_FIND 2.5
HASHTABLE_IMPORT 2.5
HASHTABLE_LOOKUP 1.5
HASHTABLE_SIZE 2.5
IF 1.15
IMAG 2.5
L2_NORMALIZATION 1.5 1.14
L2_POOL_2D 1.5
LEAKY_RELU 1.13 2.3
LESS 1.14 1.14
LESS_EQUAL 1.14 1.14
LOCAL_RESPONSE_NORMALIZATION 1.5
LOG 1.14
LOG_SOFTMAX 1.14 1.14
LOGICAL_AND 1.11
LOGICAL_NOT 1.11
LOGICAL_OR 1.11
LOGISTIC 1.14 1.14 2.3
LSH_PROJECTION 1.5
LSTM 1.7 1.10 1.14 2.3
MATRIX_DIAG 1.14
MATRIX_SET_DIAG 1.14
MAX_POOL_2D 1.5 1.14 2.3
MAXIMUM 1.14 1.14 2.3 2.3
MEAN 1.6 1.14 2.4
MINIMUM 1.14 1.14 2.3 2.3
MIRROR_PAD 1.13 2.3
MUL 1.5 1.14 1.15 2.3 2.6
MULTINOMIAL 2.8
NEG 1.9
NON_MAX_SUPPRESSION_V4 2.1
NON_MAX_SUPPRESSION_V5 2.1
NOT_EQUAL 1.14 1.14 2.3
ONE_HOT 1.11
PACK 1.11 1.14 2.3
PAD 1.5 1.14 2.4 2.6
PADV2 1.9 1.14 2.4 2.6
POW 1.10
PRELU 1.8
QUANTIZE 1.14 1.15 2.7
RANDOM_STANDARD_NORMAL 2.8
RANDOM_UNIFORM 2.8
RANGE 1.13
RANK 1.14
READ_VARIABLE 2.6
REAL 2.5
REDUCE_ALL 2.6
REDUCE_ANY 1.11
REDUCE_MAX 1.11 1.14 2.5
REDUCE_MIN 1.11 1.14 2.5
REDUCE_PROD 1.11 2.6
RELU 1.5 2.1 2.5
RELU_0_TO_1 2.10
RELU_N1_TO_1 1.5
RELU6 1.5 1.14 2.5
RESHAPE 1.5
RESIZE_BILINEAR 1.7 1.14 2.2 2.5
RESIZE_NEAREST_NEIGHBOR 1.13 1.14 2.3 2.4
REVERSE_SEQUENCE 1.14
REVERSE_V2 1.14 2.2 2.5
RFFT2D 2.5
RNN 1.5 1.14 2.3
ROUND 1.14
RSQRT 1.10 2.5
SCATTER_ND 2.1
SEGMENT_SUM 2.2
SELECT 1.14 1.14
SELECT_V2 2.2
SHAPE 1.10
SIN 1.9
SKIP_GRAM 1.5
SLICE 1.14 1.14 1.14 2.4 2.5
SOFTMAX 1.5 1.14 2.3
SPACE_TO_BATCH_ND 1.6 1.14 2.3
SPACE_TO_DEPTH 1.5 1.14
SPARSE_TO_DENSE 1.9 1.14 1.15
SPLIT 1.5 1.14 1.14 2.3
SPLIT_V 1.13 2.3
SQRT 1.10
SQUARE 1.12
SQUARED_DIFFERENCE 1.13 2.5
SQUEEZE 1.6 2.5
STRIDED_SLICE 1.6 1.14 2.1 2.2 2.5 2.6
SUB 1.6 1.14 2.3 2.4 2.4
SUM 1.10 1.15
SVDF 1.5 1.14 2.2 2.3
TANH 1.14 1.14 2.3
TILE 1.10 2.2 2.8
TOPK_V2 1.7 1.14
TRANSPOSE 1.6 1.14 1.15 2.3 2.4
TRANSPOSE_CONV 1.9 2.2 2.3
UNIDIRECTIONAL_SEQUENCE_LSTM 1.13 1.14 2.3
UNIDIRECTIONAL_SEQUENCE_RNN 1.14 1.14 2.3
UNIQUE 1.14
UNPACK 1.11 1.14 2.2 2.3
UNSORTED_SEGMENT_MAX 2.10
UNSORTED_SEGMENT_MIN 2.11
UNSORTED_SEGMENT_PROD 2.10
UNSORTED_SEGMENT_SUM 2.10
VAR_HANDLE 2.6
WHERE 1.14 2.8
WHILE 1.15
ZEROS_LIKE 1.12
"""


def _parse_runtime_table(text: str) -> dict[str, tuple[tuple[int, int] | None, ...]]:
    rows = {}
    for line in text.strip().splitlines():
        name, *versions = line.split()
        rows[name] = tuple(None if v == "-" else tuple(int(p) for p in v.split(".")) for v in versions)
    return rows


RUNTIME_VERSIONS: dict[str, tuple[tuple[int, int] | None, ...]] = _parse_runtime_table(_RUNTIME_TABLE)


def first_release(name: str, version: int) -> tuple[int, int] | str | None:
    """First TF release whose TFLite knows (op, version); "newer" past the table; None when the op has no row."""
    row = RUNTIME_VERSIONS.get(name)
    if row is None:
        return None
    if version > len(row) or version < 1 or row[version - 1] is None:
        return "newer"
    return row[version - 1]


def format_release(v: tuple[int, int] | str) -> str:
    return "a TF release after the compiler's" if v == "newer" else f"TF {v[0]}.{v[1]}"
