"""Model classes by the `architectures` name in a checkpoint's config.json."""
from quire.worker.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(config):
    """The quire class for a transformers config; ValueError naming the architecture if unsupported."""
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported architecture {architectures or '(none in config.json)'}; "
        f"quire supports {sorted(MODEL_REGISTRY)}"
    )
