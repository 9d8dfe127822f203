"""The official CycleQD DB-Bench and OS-interaction prompts and limits, as pure functions
and constants.

Sources (read, not copied; SakanaAI/CycleQD stored version e5ccb24, the protocol's reference
commit is 3d14971):

- ``tasks/agentbench_db.py``: ``db_prompt_template``, the 3-message conversation
  (prompt, "Ok.", question), the answer field (``answer_md5`` for INSERT/DELETE/UPDATE, else
  ``label``), ``MAX_ROUND = 5``, greedy with 512 tokens and no stop strings, the LLAMA3 template;
- ``tasks/agentbench_os.py``: ``MAX_ROUND = 5``, 5 evaluations averaged, greedy 512 tokens;
- ``evaluation/fishfarm/fishfarm/tasks/os_interaction.py``: ``PROMPT`` (typo "I'will"
  kept), ``ONE_SHOT``, the OS-output message and its 800-character truncation, the 5 s
  limit per command (socket timeout and per-turn future timeout);
- fishfarm ``chat_templates.LLAMA3`` and ``models/vllm_model.py`` (read from the fishfarm
  copy shipped with SakanaAI's Transformer-squared; CycleQD's stored copy lacks them): the
  template puts ``bos_token`` before the first message, and the rendered string goes to
  ``LLM.generate``, which adds the tokenizer's BOS again -- so the official DB and OS
  prompts start with two BOS tokens. Send :func:`llama3_prompt` as a raw prompt to
  reproduce that.

The 7-message OS ``problem`` of each official search sample is stored in
``cycleqd-official/os_search_samples.json``; :func:`os_problem` rebuilds it from the task
description (byte-identical for all 110, tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: importing cycleqd.inference loads torch, which the agent
    from cycleqd.inference.base import Message  # skills (and `cycleqd validate`) must not

#: greedy decoding, at most 512 new tokens per turn, no stop strings (DB and OS)
MAX_NEW_TOKENS = 512
DB_MAX_ROUND = 5
OS_MAX_ROUND = 5
#: seconds one OS command may run
OS_COMMAND_TIMEOUT_S = 5.0
#: the OS quality is the mean accuracy of this many full evaluations
OS_REPEATS = 5
#: OS output longer than this is cut to OS_TRUNCATE_TO characters plus a note
OS_OUTPUT_LIMIT = 800
OS_TRUNCATE_TO = 780

DB_PROMPT = (
    "\n"
    "I will ask you a question, then you should help me operate a MySQL database with SQL to "
    "answer the question.\n"
    "You have to explain the problem and your solution to me and write down your thoughts.\n"
    "After thinking and explaining thoroughly, every round you can choose to operate or to "
    "answer.\n"
    "your operation should be like this:\n"
    "Action: Operation\n"
    "```sql\n"
    "SELECT * FROM table WHERE condition;\n"
    "```\n"
    "You MUST put SQL in markdown format without any other comments. Your SQL should be in "
    "one line.\n"
    "Every time you can only execute one SQL statement. I will only execute the statement in "
    "the first SQL code block. Every time you write a SQL, I will execute it for you and give "
    "you the output.\n"
    "If you are done operating, and you want to commit your final answer, then write down:\n"
    "Action: Answer\n"
    'Final Answer: ["ANSWER1", "ANSWER2", ...]\n'
    "DO NOT write this pattern unless you are sure about your answer. I expect an accurate "
    "and correct answer.\n"
    "Your answer should be accurate. Your answer must be exactly the same as the correct "
    "answer.\n"
    "If the question is about modifying the database, then after done operation, your answer "
    "field can be anything.\n"
    "If your response cannot match any pattern I mentioned earlier, you will be judged as "
    "FAIL immediately.\n"
    "Your input will be raw MySQL response, you have to deal with it by yourself.\n"
)

OS_PROMPT = (
    "You are an assistant that will act like a person, I'will play the role of linux(ubuntu) "
    "operating system. Your goal is to implement the operations required by me or answer to "
    "the question proposed by me. For each of your turn, you should first think what you "
    'should do, and then take exact one of the three actions: "bash", "finish" or "answer". '
    "\n\n"
    "1. If you think you should execute some bash code, take bash action, and you should "
    "print like this:\n\nThink: put your thought here.\n\nAct: bash\n\n```bash\n"
    "# put your bash code here\n```\n\n"
    "2. If you think you have finished the task, take finish action, and you should print "
    "like this:\n\nThink: put your thought here.\n\nAct: finish\n\n"
    "3. If you think you have got the answer to the question, take answer action, and you "
    "should print like this:\n\nThink: put your thought here.\n\n"
    "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\n"
    "If the output is too long, I will truncate it. The truncated output is not complete. "
    "You have to deal with the truncating problem by yourself. Attention, your bash code "
    "should not contain any input operation. Once again, you should take only exact one of "
    "the three actions in each turn.\n\n"
)

#: the one-shot exchange (AgentBench.old), user turn first
OS_ONE_SHOT: tuple[Message, ...] = (
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {"role": "assistant", "content": "Think: To count the files in /etc, I need to print all "
     "the files in it.\n\nAct: bash\n\n```bash\nls /etc\n```"},
    {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm "
     "networkd-dispatcher protocols selinux tmpfiles.d [truncated because the output is too "
     "long]"},
    {"role": "assistant", "content": "Think: The output has been truncated because it is too "
     "long, so I need to count files by script directly.\n\nAct: bash\n\n```bash\n"
     "ls -1 /etc | wc -l\n```"},
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
)


def db_messages(row: Mapping[str, Any]) -> list[Message]:
    """The official opening conversation of one DB-Bench row (``description`` and
    ``add_description`` of ``cycleqd-official/dbbench_standard_dev.jsonl``): the prompt, the
    assistant's "Ok.", then ``description + "\\n" + add_description``.

    Raises:
        KeyError: ``row`` lacks ``description`` or ``add_description``.
    """
    return [{"role": "user", "content": DB_PROMPT},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": f"{row['description']}\n{row['add_description']}"}]


def db_answer(row: Mapping[str, Any]) -> Any:
    """The official expected answer: ``answer_md5`` (the table's hash after the episode) for
    INSERT / DELETE / UPDATE rows, else ``label`` (compared exactly, no tolerance)."""
    return row["answer_md5"] if row["type"][0] in ("INSERT", "DELETE", "UPDATE") else row["label"]


def os_problem(description: str) -> list[Message]:
    """The official 7-message opening of an OS task: ``OS_PROMPT`` + "Now, my problem is:"
    + the one-shot question, the one-shot exchange, then the task description."""
    first = {"role": "user",
             "content": f"{OS_PROMPT}Now, my problem is:\n\n{OS_ONE_SHOT[0]['content']}"}
    last = {"role": "user", "content": "Now, I will start a new problem in a new OS. "
            f"My problem is:\n\n{description}"}
    return [first, *(dict(m) for m in OS_ONE_SHOT[1:]), last]


def os_observation(output: str) -> str:
    """The user message that reports a command's output (official ``process_single_turn``):
    cut to ``OS_TRUNCATE_TO`` characters plus a note when longer than ``OS_OUTPUT_LIMIT``."""
    if len(output) > OS_OUTPUT_LIMIT:
        output = output[:OS_TRUNCATE_TO] + "\n[truncated because the output is too long]"
    return f"The output of the OS:\n\n{output}" if output else "The output of the OS is empty."


def llama3_prompt(messages: Sequence[Message], bos_token: str = "<|begin_of_text|>") -> str:
    """The string fishfarm's ``LLAMA3`` chat template renders (generation prompt included):
    per message ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``,
    ``bos_token`` before the first, then ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
    Sent as a raw prompt, the tokenizer adds its own BOS in front, as in the official runs."""
    parts = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
             for m in messages]
    return (bos_token if parts else "") + "".join(parts) + \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


#: how the agent skills render a conversation for the backend: ``model`` (the model's own
#: chat template, one BOS) or ``llama3-official`` (the official code's: fishfarm's LLAMA3
#: string, :func:`llama3_prompt`, sent as a raw prompt, so a Llama-3 tokenizer puts a second
#: BOS in front). Only meaningful for a Llama-3 model; the official code hard-codes it.
CHAT_FORMATS = ("model", "llama3-official")

#: what ``protocol: official`` fixes, per agent skill: parameter -> the official value. A
#: config that sets one of them to another value is refused (:func:`check_fixed`); ``repeats``
#: (OS) is deliberately not among them (see the skill's docstring).
DB_FIXED: dict[str, Any] = {"max_rounds": DB_MAX_ROUND, "max_new_tokens": MAX_NEW_TOKENS,
                            "stop": (), "tolerance": 1e-2}
OS_FIXED: dict[str, Any] = {"max_rounds": OS_MAX_ROUND, "max_new_tokens": MAX_NEW_TOKENS,
                            "command_timeout_s": OS_COMMAND_TIMEOUT_S, "stop": (), "one_shot": True}


def _same(given: Any, official_value: Any) -> bool:
    if isinstance(official_value, tuple):
        return given is not None and not isinstance(given, str) and tuple(given) == official_value
    if isinstance(official_value, bool) or isinstance(given, bool):
        return given is official_value
    if isinstance(official_value, (int, float)):
        return isinstance(given, (int, float)) and float(given) == float(official_value)
    return bool(given == official_value)


def check_fixed(params: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """Refuse a parameter that ``protocol: official`` fixes when ``params`` sets it to another
    value (None / absent = the official value). For DB-Bench, ``tolerance`` is fixed because
    the official scorer compares exactly and would silently ignore it.

    Raises:
        ValueError: ``"<param>: protocol 'official' fixes it at <value> (...); got <given>"``
            (one line; the config checker prefixes the field path).
    """
    for key, value in fixed.items():
        given = params.get(key)
        if given is not None and not _same(given, value):
            if key == "tolerance":
                raise ValueError(f"tolerance: protocol 'official' compares answers exactly (AgentBench "
                                 f"v0.2 scorer), a tolerance would be ignored; got {given!r}")
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{key}: protocol 'official' fixes it at {shown!r} (the official code's "
                             f"setting); got {given!r} -- use protocol 'project' to change it")


def check_chat_format(params: Mapping[str, Any], protocol: str) -> str:
    """The ``chat_format`` argument (default ``model``); ``llama3-official`` only under
    ``protocol: official``. Raises ValueError naming it."""
    fmt = params.get("chat_format", "model")
    if fmt is None:
        fmt = "model"
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {list(CHAT_FORMATS)}, got {fmt!r}")
    if fmt != "model" and protocol != "official":
        raise ValueError(f"chat_format {fmt!r} is the official protocol's rendering: needs protocol 'official'")
    return fmt


def render_for(chat_format: str, generate: Callable[[list], list[str]]) -> Callable[[list], list[str]]:
    """``generate`` itself for ``chat_format="model"``; for ``"llama3-official"`` a wrapper
    that turns each conversation into :func:`llama3_prompt`'s raw string first (the official
    DB/OS rendering, double BOS with a Llama-3 tokenizer)."""
    if chat_format == "model":
        return generate
    return _Llama3Rendered(generate)


class _Llama3Rendered:
    """``generate`` over :func:`llama3_prompt` strings; keeps the wrapped one's ``submit``
    (a pooled backend: episodes then run at their own pace, ``run_streaming``)."""

    def __init__(self, generate: Callable[[list], list[str]]) -> None:
        self._generate = generate
        if callable(getattr(generate, "submit", None)):
            self.submit = lambda conv: generate.submit(llama3_prompt(conv))

    def __call__(self, convs: list) -> list[str]:
        return self._generate([llama3_prompt(c) for c in convs])
