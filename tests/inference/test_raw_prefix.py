"""Raw prompts (no chat template) and pre-filled response prefixes, on both backends: the
model sees exactly the hand-built tokens, and both backends build the same ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cycleqd.inference import HFBackend
from cycleqd.inference.vllm_backend import VLLMBackend

PREFIX = "```python\n"


@pytest.fixture(scope="module")
def be(tiny_llama_dirs):
    return HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=4)


@torch.inference_mode()
def _greedy_by_hand(be: HFBackend, ids: list[int], n: int) -> str:
    """Plain greedy without cache or batching: the reference for one prompt."""
    ids, out = list(ids), []
    for _ in range(n):
        tok = int(be.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if tok in be._eos_ids:
            break
        ids.append(tok)
        out.append(tok)
    return be.tokenizer.decode(out, skip_special_tokens=True)


def test_raw_prompt_is_the_text_hand_tokenised(be):
    texts = ["@@ Instruction:\nWrite a function.\n\n@@ Response:", "def add(a, b):", "x" * 50]
    out = be.generate(texts, max_new_tokens=10)
    ref = [_greedy_by_hand(be, be.tokenizer(t)["input_ids"], 10) for t in texts]
    assert out == ref and len(set(out)) > 1
    # a raw prompt is not the chat-rendered conversation with the same text
    chat = be.generate([[{"role": "user", "content": t}] for t in texts], max_new_tokens=10)
    assert chat != out


def test_prefix_continues_the_rendered_prompt_and_is_excluded(be, convs):
    out = be.generate(convs, max_new_tokens=10, response_prefix=PREFIX)
    ref = [_greedy_by_hand(be, be.tokenizer(be.render(c) + PREFIX, add_special_tokens=False)
                           ["input_ids"], 10) for c in convs]
    assert out == ref
    assert out != be.generate(convs, max_new_tokens=10)
    # a raw prompt continues after the prefix too; equals the raw prompt with the prefix in it
    raw = "def add(a, b):"
    assert be.generate([raw], max_new_tokens=8, response_prefix=PREFIX) == \
        be.generate([raw + PREFIX], max_new_tokens=8)


def test_mixed_batch_equals_one_by_one(be, convs):
    mixed = [c if i % 2 else be.render(c) + "Sure" for i, c in enumerate(convs)]
    batched = be.generate(mixed, max_new_tokens=12, response_prefix="ok")
    single = [be.generate([c], max_new_tokens=12, response_prefix="ok")[0] for c in mixed]
    assert batched == single


def test_raw_prompt_gets_the_tokenizers_special_tokens(tiny_llama_dirs):
    """A raw prompt is tokenised like vLLM tokenises a text prompt (BOS included where the
    tokenizer adds one, as Llama 3's does); a rendered chat gets none added."""
    from tokenizers.processors import TemplateProcessing

    be = HFBackend.from_pretrained(tiny_llama_dirs[0])
    bos = be.tokenizer.convert_tokens_to_ids("<|im_start|>")
    be.tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    plain = be.tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert be.prompt_ids("hi") == [bos] + plain
    assert be.prompt_ids("hi", "!") == [bos] + be.tokenizer("hi!", add_special_tokens=False)["input_ids"]
    conv = [{"role": "user", "content": "hi"}]
    assert be.prompt_ids(conv) == be.tokenizer(be.render(conv), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kwargs, field", [
    ({"conversations": [""], "max_new_tokens": 4}, "empty raw prompt"),
    ({"conversations": [b"x"], "max_new_tokens": 4}, "conversations\\[0\\]"),
    ({"conversations": ["x"], "max_new_tokens": 4, "response_prefix": None}, "response_prefix"),
])
def test_bad_raw_and_prefix_args(be, kwargs, field):
    with pytest.raises(ValueError, match=field):
        be.generate(**kwargs)


class _FakeLLM:
    """Records what VLLMBackend sends to ``LLM.generate`` / ``LLM.chat``."""

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, []

    def get_tokenizer(self):
        return SimpleNamespace(tokenizer=self.tok)  # wrapped, as some vLLM versions do

    def _outs(self, n):
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"r{i} Instruction: x")])
                for i in range(n)]

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", prompts))
        return self._outs(len(prompts))

    def chat(self, convs, params, **kwargs):
        self.calls.append(("chat", convs))
        return self._outs(len(convs))


def test_vllm_sends_the_same_tokens_as_hf(be, convs):
    llm = _FakeLLM(be.tokenizer)
    vb = VLLMBackend(None, llm=llm, reference_shapes={"w": (1,)})
    vb._sampling_params = lambda n, stop: None     # vllm.SamplingParams (vLLM absent on CPU)
    mixed = ["raw prompt", *convs[:3]]
    out = vb.generate(mixed, max_new_tokens=4, stop=["Instruction"], response_prefix=PREFIX)
    kind, prompts = llm.calls[-1]
    assert kind == "generate" and out == [f"r{i} " for i in range(4)]
    assert [p["prompt_token_ids"] for p in prompts] == [be.prompt_ids(c, PREFIX) for c in mixed]
    vb.generate(convs, max_new_tokens=4)           # plain chat: unchanged path
    assert llm.calls[-1][0] == "chat"


@pytest.mark.gpu
@pytest.mark.skipif(not (__import__("importlib").util.find_spec("vllm") and torch.cuda.is_available()),
                    reason="needs vllm and a CUDA GPU")
def test_real_vllm_raw_and_prefix_match_hf(tiny_llama_dirs, convs):
    """On a GPU: the real engine's raw-prompt and prefixed replies agree with HF's (near ties
    of a random tiny model may flip a reply or two)."""
    a = tiny_llama_dirs[0]
    hf = HFBackend.from_pretrained(a, device="cuda")
    vb = VLLMBackend(a, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024)
    mixed = [hf.render(c) if i % 2 else c for i, c in enumerate(convs)]
    got = vb.generate(mixed, max_new_tokens=12, response_prefix=PREFIX)
    ref = hf.generate(mixed, max_new_tokens=12, response_prefix=PREFIX)
    assert sum(x == y for x, y in zip(got, ref)) >= len(convs) - 2
