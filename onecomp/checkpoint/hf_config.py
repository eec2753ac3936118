"""The ``quantization_config`` every checkpoint's ``config.json`` carries, so plain transformers
never loads a OneComp checkpoint as random weights.

transformers skips a ``quant_method`` it does not know with only a warning and then leaves every
packed layer randomly initialised; it raises on a known method whose fields are invalid, and puts
the offending value in its message. So a checkpoint with packed modules declares ``gptq`` with
``bits`` set to the sentence telling the user what to do: transformers (and vLLM, which checks
``bits`` the same way) fail with that sentence. A checkpoint whose modules are all ``dense``
loads correctly in transformers and declares ``quant_method = "onecomp"``.
"""

from __future__ import annotations


def quantization_config(modules: dict, registry) -> dict:
    """The block for a manifest's ``modules`` table (module name -> {"format": ...})."""
    formats = sorted({e["format"] for e in modules.values()})
    info = {"formats": formats, "loader": "onecomp.load", "manifest": "onecomp.json"}
    packed = [f for f in formats if f != "dense"]
    if not packed:
        return {"quant_method": "onecomp", "onecomp": info}
    exportable = [f for f in packed if _exportable(f, registry)]
    sentence = (f"this is a OneComp checkpoint (formats: {', '.join(packed)}) that transformers cannot read; "
                "load it with onecomp.load(path) (pip install onecomp and the plugin of each format)")
    if exportable == packed:
        sentence += ", or convert it with `onecomp export PATH --to compressed-tensors|gptq|gguf OUT`"
    return {"quant_method": "gptq", "bits": sentence, "onecomp": info}


def _exportable(name: str, registry) -> bool:
    try:
        return hasattr(registry.get("format", name), "as_affine_int")
    except Exception:
        return False
