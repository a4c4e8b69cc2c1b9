"""Export an edit so other tools can use it without steerlab: ``hf`` (a merged checkpoint,
:mod:`.hf`), ``lora`` (a PEFT LoRA adapter, :mod:`.lora`), ``gguf-cvec`` (a llama.cpp
control vector, :mod:`.gguf_cvec`)."""
