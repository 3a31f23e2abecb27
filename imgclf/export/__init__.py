"""Exporters: one module per format (to_onnx, to_tflite, to_coreml), each with a write(job)
function that converts, checks against the checkpoint and writes atomically; checks.py holds
what they share. imgclf/cli/export.py's FORMATS table picks one by --format."""
