"""LoRDBA: binary low-rank adapters with channel scales, trained on a quantized base (and fp16 LoRA)."""

from .formats import LoRAFormat, LoRDBAFormat, binarize
from .packing import pack_signs, unpack_signs
from .refiner import LoRDBA, LoRDBAConfig

__all__ = ["LoRAFormat", "LoRDBA", "LoRDBAConfig", "LoRDBAFormat", "binarize", "pack_signs", "unpack_signs"]
