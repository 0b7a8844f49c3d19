"""The .tflite file itself: a TF-free flatbuffer reader and the named metadata xqat stores inside it."""
