"""The official CycleQD MBPP+ prompt and decoding, as pure functions and constants.

Source (read, not copied): SakanaAI/CycleQD ``tasks/mbpp.py`` (stored version e5ccb24; the
protocol's reference commit is 3d14971): the Magicoder-style Jinja template
``code_chat_templates``, the system message, ``SamplingParams`` and the ``_base_pass@1``
quality. That repository's fishfarm copy lacks ``tasks/evalplus/``; the same fishfarm
library as shipped with SakanaAI's Transformer-squared (read from its copies
``evaluation/fishfarm/fishfarm/tasks/evalplus/{data,generation}.py`` and
``models/vllm_model.py``) gives the rest: ``map_mbpp_problem`` (instruction + one assertion,
response prefix ``"```python"``), ``VLLMModel._into_prompt`` (template rendered with
``add_generation_prompt=True``, then the prefix appended, the string sent to
``LLM.generate``, so vLLM adds the tokenizer's BOS) and the completion cut at the first
"```".

Use: ``backend.generate([mbpp_prompt(mbpp_instruction(p))], max_new_tokens=MAX_NEW_TOKENS,
stop=STOP, response_prefix=RESPONSE_PREFIX)`` -- a raw prompt, so no chat template is added.
"""

from __future__ import annotations

#: the official system message (``tasks/mbpp.py``)
SYSTEM_MESSAGE = ("You are an exceptionally intelligent coding assistant that consistently "
                  "delivers accurate and reliable responses to user instructions.")
#: the assistant reply is pre-filled with this (no newline after it)
RESPONSE_PREFIX = "```python"
#: greedy decoding (temperature 0, top_p 1, repetition penalty 1), at most 512 new tokens
MAX_NEW_TOKENS = 512
STOP = ("Instruction:", "Instruction", "Response:", "Response")


def release_prompt(text: str, first_test: str) -> str:
    """The ``prompt`` field of the MBPP+ release the official code downloads
    (``evalplus.data.get_mbpp_plus``, v0.1.0): the problem statement and the original MBPP
    problem's first test in a docstring.

    Reconstructed from sanitized MBPP (``text``, ``test_list[0]``); it matches the published
    release strings for Mbpp/2 (``assert set(similar_elements(...)) == set((4, 5))``) and
    Mbpp/3. The MBPP+ development file's ``assertion`` field differs from it for 31 of the
    399 problems (asserts rewritten by EvalPlus), so it must not be used for the prompt.
    """
    return f'"""\n{text}\n{first_test}\n"""\n'


def mbpp_instruction(prompt: str) -> str:
    """The user instruction the official code builds from an MBPP+ release ``prompt``
    (fishfarm ``map_mbpp_problem``): the docstring's statement (a "." appended if missing),
    then "Your code should satisfy the following assertion:" and the assertion in a
    ```python block.

    Raises:
        ValueError: ``prompt`` has no triple-quoted docstring or no ``assert`` in it.
    """
    start, end = prompt.find('"""'), prompt.rfind('"""')
    if start == -1 or end == start:
        raise ValueError('mbpp_instruction: prompt has no """-quoted docstring')
    body = prompt[start + 3:end]
    k = body.find("assert")
    if k == -1:
        raise ValueError("mbpp_instruction: the docstring has no assertion")
    statement = body[:k].strip()
    if not statement.endswith("."):
        statement += "."
    return (f"{statement} Your code should satisfy the following assertion:\n"
            f"```python\n{body[k:].strip()}\n```")


def mbpp_prompt(instruction: str, system: str = SYSTEM_MESSAGE) -> str:
    """The raw prompt text the official Magicoder template renders for a system message
    and one user instruction, generation prompt included (``RESPONSE_PREFIX`` not included):
    ``system.strip() + "\\n\\n@@ Instruction:\\n" + instruction.strip() + "\\n\\n@@ Response:"``.
    """
    return f"{system.strip()}\n\n@@ Instruction:\n{instruction.strip()}\n\n@@ Response:"


def completion_body(reply: str) -> str:
    """The code the official code keeps from a reply (which continues after
    ``RESPONSE_PREFIX``): everything before the first "```" (fishfarm ``generation.py``);
    EvalPlus's MBPP sanitiser runs on it afterwards."""
    k = reply.find("```")
    return reply if k == -1 else reply[:k]


#: what the official protocol fixes for ``type: mbppplus``: parameter -> the official value
#: (None / absent in a config = the official value); another value is refused by
#: :func:`check_fixed`, never silently replaced
FIXED = {"max_new_tokens": MAX_NEW_TOKENS, "stop": STOP, "system_prompt": SYSTEM_MESSAGE}


def check_fixed(params: dict) -> None:
    """Refuse an ``mbppplus`` parameter set to another value than the official protocol's
    (:data:`FIXED`).

    Raises:
        ValueError: ``"<param>: protocol 'official' (type mbppplus) fixes it at <value> ...;
            got <given>"`` (one line; the config checker prefixes the field path).
    """
    for key, value in FIXED.items():
        given = params.get(key)
        if given is None:
            continue
        same = (tuple(given) == value if isinstance(value, tuple) and not isinstance(given, str)
                else given == value and type(given) is type(value))
        if not same:
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{key}: protocol 'official' (type mbppplus) fixes it at {shown!r} (the "
                             f"official code's setting); got {given!r} -- use type 'mbpp' to change it")
