"""The methods `bench` compares, and what each of the trainer's adapter methods sets in the run specification."""

FULL_METHODS = ("full", "full-8bit")
ADAPTER_METHODS = {"lora": {"adapter.type": "lora", "quantization.mode": "none"},
                   "qlora": {"adapter.type": "lora", "quantization.mode": "nf4"},
                   "loha": {"adapter.type": "loha", "quantization.mode": "nf4"},
                   "lokr": {"adapter.type": "lokr", "quantization.mode": "nf4"}}
METHODS = FULL_METHODS + tuple(ADAPTER_METHODS)
