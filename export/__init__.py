"""ONNX export of MAGNeT models and the onnxruntime backend.

    export.onnx_export.export_model(model, out)   # `magnet export --model M --out DIR`
    export.ort.load_engine(out)                   # `magnet generate --backend onnx --model DIR`

onnx, onnxscript and onnxruntime are imported inside these modules only; importing `export` stays light.
"""
