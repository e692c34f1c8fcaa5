"""Presets of the OpenAI-compatible kind: the public and self-hosted endpoints that speak OpenAI's
Chat Completions API, each with what it needs and honours.

A preset name is also a provider name: `providers: {groq: {}}` serves Groq with its key from
GROQ_API_KEY. Every field can be overridden in the provider's section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pluggably.core.types import Capabilities

_ALL_SAMPLING = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    base_url: str
    api_key_env: str | None
    requires_key: bool
    max_tokens_field: str  # "max_tokens" | "max_completion_tokens"
    stream_usage: bool  # send stream_options.include_usage
    supported_parameters: tuple[str, ...]
    # Capabilities of models the gateway knows nothing more about.
    default_capabilities: Capabilities
    docs: str
    notes: str = ""
    # Parameter names of this endpoint where they differ from OpenAI's.
    parameter_names: dict[str, str] = field(default_factory=dict)
    list_models: bool = True
    # What the endpoint would silently ignore or refuse; the gateway rejects such requests with
    # INVALID_ARGUMENT instead: a tool_choice other than auto, image URLs (inline images only),
    # and `name` on messages.
    tool_choice: bool = True
    image_urls: bool = True
    message_names: bool = True


_HOSTED_DEFAULTS = Capabilities(tools=True, json_object=True, json_schema=True)
_SELF_HOSTED_DEFAULTS = Capabilities(json_object=True, json_schema=True)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "openai",
            "OpenAI",
            "https://api.openai.com/v1",
            "OPENAI_API_KEY",
            True,
            "max_completion_tokens",
            True,
            _ALL_SAMPLING,
            Capabilities(tools=True, json_object=True, json_schema=True),
            "https://platform.openai.com/docs/api-reference/chat",
            "Known models (gpt-4o, gpt-4.1, gpt-5, o-series) get their image input and limits from a "
            "built-in table; listed non-chat models (embeddings, audio, images) are left out.",
        ),
        Preset(
            "openrouter",
            "OpenRouter",
            "https://openrouter.ai/api/v1",
            "OPENROUTER_API_KEY",
            True,
            "max_tokens",
            True,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            _HOSTED_DEFAULTS,
            "https://openrouter.ai/docs/api-reference/overview",
            "Model names contain '/': `openrouter/meta-llama/llama-3.3-70b-instruct`. Optional "
            "`headers: {HTTP-Referer: ..., X-Title: ...}` attribute your app.",
        ),
        Preset(
            "groq",
            "Groq",
            "https://api.groq.com/openai/v1",
            "GROQ_API_KEY",
            True,
            "max_completion_tokens",
            True,
            _ALL_SAMPLING,
            _HOSTED_DEFAULTS,
            "https://console.groq.com/docs/openai",
            "Groq rejects logprobs, logit_bias and `name` on messages (the gateway drops names).",
            message_names=False,
        ),
        Preset(
            "together",
            "Together AI",
            "https://api.together.xyz/v1",
            "TOGETHER_API_KEY",
            True,
            "max_tokens",
            True,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            _HOSTED_DEFAULTS,
            "https://docs.together.ai/reference/chat-completions-1",
            "Its model list is a bare JSON array (handled).",
        ),
        Preset(
            "mistral",
            "Mistral AI",
            "https://api.mistral.ai/v1",
            "MISTRAL_API_KEY",
            True,
            "max_tokens",
            False,
            _ALL_SAMPLING,
            _HOSTED_DEFAULTS,
            "https://docs.mistral.ai/api/",
            "The seed is sent as `random_seed`; usage arrives on the last stream chunk unasked "
            "(Mistral rejects `stream_options`).",
            parameter_names={"seed": "random_seed"},
        ),
        Preset(
            "deepseek",
            "DeepSeek",
            "https://api.deepseek.com/v1",
            "DEEPSEEK_API_KEY",
            True,
            "max_tokens",
            True,
            ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty"),
            Capabilities(tools=True, json_object=True),
            "https://api-docs.deepseek.com/api/create-chat-completion",
            "JSON object output only (no JSON schema); no seed.",
        ),
        Preset(
            "fireworks",
            "Fireworks AI",
            "https://api.fireworks.ai/inference/v1",
            "FIREWORKS_API_KEY",
            True,
            "max_tokens",
            False,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            _HOSTED_DEFAULTS,
            "https://docs.fireworks.ai/api-reference/post-chatcompletions",
            "Model names are paths: `fireworks/accounts/fireworks/models/llama-v3p1-8b-instruct`. "
            "Usage arrives on the last stream chunk unasked; list your models in `models:`.",
            list_models=False,
        ),
        Preset(
            "huggingface",
            "Hugging Face Inference Providers",
            "https://router.huggingface.co/v1",
            "HF_TOKEN",
            True,
            "max_tokens",
            True,
            _ALL_SAMPLING,
            _HOSTED_DEFAULTS,
            "https://huggingface.co/docs/inference-providers/index",
            "Model names are Hub repo ids, optionally with a provider suffix: "
            "`huggingface/meta-llama/Llama-3.1-8B-Instruct:cerebras`.",
        ),
        Preset(
            "ollama",
            "Ollama",
            "http://localhost:11434/v1",
            None,
            False,
            "max_tokens",
            True,
            _ALL_SAMPLING,
            _SELF_HOSTED_DEFAULTS,
            "https://github.com/ollama/ollama/blob/main/docs/openai.md",
            "No key. Tool calling and image input depend on the model: enable them per model "
            "(`models: [{name: llama3.2, capabilities: {tools: true}}]`). Ollama ignores tool_choice "
            "and takes inline images only, so the gateway rejects both rather than lose them.",
            tool_choice=False,
            image_urls=False,
        ),
        Preset(
            "vllm",
            "vLLM OpenAI-compatible server",
            "http://localhost:8000/v1",
            "VLLM_API_KEY",
            False,
            "max_tokens",
            True,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            _SELF_HOSTED_DEFAULTS,
            "https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html",
            "A key only when the server runs with --api-key. Tool calling needs the server's "
            "--enable-auto-tool-choice and a tool parser: enable `tools` per model then.",
        ),
        Preset(
            "lmstudio",
            "LM Studio",
            "http://localhost:1234/v1",
            "LM_API_TOKEN",
            False,
            "max_tokens",
            True,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            Capabilities(json_schema=True),
            "https://lmstudio.ai/docs/app/api/endpoints/openai",
            'A key only with "Require Authentication". JSON schema output but no JSON object mode. '
            "The repetition penalty is sent as `repeat_penalty`.",
            parameter_names={"repetition_penalty": "repeat_penalty"},
        ),
        Preset(
            "llamacpp",
            "llama.cpp server",
            "http://localhost:8080/v1",
            "LLAMA_API_KEY",
            False,
            "max_tokens",
            True,
            (*_ALL_SAMPLING, "top_k", "repetition_penalty"),
            _SELF_HOSTED_DEFAULTS,
            "https://github.com/ggml-org/llama.cpp/tree/master/tools/server",
            "A key only with --api-key. Its default port 8080 is also Envoy's: run it elsewhere or "
            "move Envoy (`make run HTTP_PORT=...`). The repetition penalty is sent as `repeat_penalty`.",
            parameter_names={"repetition_penalty": "repeat_penalty"},
        ),
        Preset(
            "generic",
            "Any OpenAI-compatible endpoint",
            "http://localhost:8000/v1",
            None,
            False,
            "max_tokens",
            True,
            _ALL_SAMPLING,
            _SELF_HOSTED_DEFAULTS,
            "https://platform.openai.com/docs/api-reference/chat",
            "The default when a provider of kind openai sets its own base_url.",
        ),
    )
}
