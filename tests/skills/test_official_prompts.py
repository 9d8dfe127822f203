"""The official CycleQD prompts, byte for byte: each expected string below was written from
reading the official code (SakanaAI/CycleQD tasks/*.py and its fishfarm library), not from
the builders under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cycleqd.skills.agentbench import official as ab
from cycleqd.skills.coding import official as code

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers "
          "accurate and reliable responses to user instructions.")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder is not mounted here)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MBPP_EXPECTED = {
    2: SYSTEM + "\n\n@@ Instruction:\nWrite a function to find the shared elements from the given "
       "two lists. Your code should satisfy the following assertion:\n```python\n"
       "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n```\n\n"
       "@@ Response:```python",
    3: SYSTEM + "\n\n@@ Instruction:\nWrite a python function to identify non-prime numbers. "
       "Your code should satisfy the following assertion:\n```python\n"
       "assert is_not_prime(2) == False\n```\n\n@@ Response:```python",
    4: SYSTEM + "\n\n@@ Instruction:\nWrite a function to find the n largest integers from a "
       "given list of numbers, returned in descending order. Your code should satisfy the "
       "following assertion:\n```python\nassert heap_queue_largest( [25, 35, 22, 85, 14, 65, "
       "75, 22, 58],3)==[85, 75, 65]\n```\n\n@@ Response:```python",
}


@pytest.mark.parametrize("task", sorted(MBPP_EXPECTED))
def test_mbpp_prompt_is_the_official_text(task):
    plus = {r["task_id"] for r in _jsonl(DATA / "mbppplus" / "MbppPlus.jsonl")}
    mbpp = {r["task_id"]: r for r in _jsonl(DATA / "mbpp" / "sanitized-mbpp.jsonl")}
    assert f"Mbpp/{task}" in plus
    row = mbpp[task]
    release = code.release_prompt(row["text"], row["test_list"][0])
    assert code.mbpp_prompt(code.mbpp_instruction(release)) + code.RESPONSE_PREFIX == \
        MBPP_EXPECTED[task]


def test_mbpp_instruction_rules_and_decoding():
    # a statement without a final "." gets one; the first "assert" starts the assertion
    assert code.mbpp_instruction('"""\nAdd two numbers\nassert add(1, 2) == 3\n"""\n') == \
        "Add two numbers. Your code should satisfy the following assertion:\n```python\n" \
        "assert add(1, 2) == 3\n```"
    with pytest.raises(ValueError, match="assertion"):
        code.mbpp_instruction('"""\nno test here\n"""')
    with pytest.raises(ValueError, match="docstring"):
        code.mbpp_instruction("assert f() == 1")
    assert code.STOP == ("Instruction:", "Instruction", "Response:", "Response")
    assert code.MAX_NEW_TOKENS == 512 and code.RESPONSE_PREFIX == "```python"
    assert code.completion_body("\ndef f():\n    return 1\n```\nThis works.") == \
        "\ndef f():\n    return 1\n"


DB_PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""

DB_EXPECTED = {
    0: "What are the Notes when the Method is decision?\nThe name of this table is Jiu-Jitsu "
       "Championships Results, and the headers of this table are Result,Opponent,Method,Event,"
       "Notes.",
    150: "Data for a recent football match against Australia was inserted into the database "
         "with information on the date, venue, opponents, score, and competition.\nThe name of "
         "this table is football_matches, and the headers of this table are Date,Venue,"
         "Opponents,Score,Competition.",
    300: "What is the Presentation of Credentials has a Termination of Mission listed as August "
         "15, 2000?\nThe name of this table is US Ambassadors and Envoy Extraordinary to "
         "Colombia, and the headers of this table are Representative,Title,Presentation of "
         "Credentials,Termination of Mission,Appointed by.",
}


@pytest.mark.parametrize("row_index", sorted(DB_EXPECTED))
def test_db_messages_are_the_official_ones(row_index):
    row = _jsonl(DATA / "cycleqd-official" / "dbbench_standard_dev.jsonl")[row_index]
    assert ab.db_messages(row) == [{"role": "user", "content": DB_PROMPT},
                                   {"role": "assistant", "content": "Ok."},
                                   {"role": "user", "content": DB_EXPECTED[row_index]}]
    want = row["answer_md5"] if row_index == 150 else row["label"]   # 150 is an INSERT
    assert ab.db_answer(row) == want
    assert ab.DB_MAX_ROUND == 5 and ab.MAX_NEW_TOKENS == 512


OS_FIRST = (
    'You are an assistant that will act like a person, I\'will play the role of linux(ubuntu) '
    'operating system. Your goal is to implement the operations required by me or answer to the '
    'question proposed by me. For each of your turn, you should first think what you should do, '
    'and then take exact one of the three actions: "bash", "finish" or "answer". \n\n'
    '1. If you think you should execute some bash code, take bash action, and you should print '
    'like this:\n\nThink: put your thought here.\n\nAct: bash\n\n```bash\n# put your bash code '
    'here\n```\n\n2. If you think you have finished the task, take finish action, and you should '
    'print like this:\n\nThink: put your thought here.\n\nAct: finish\n\n3. If you think you have '
    'got the answer to the question, take answer action, and you should print like this:\n\n'
    'Think: put your thought here.\n\nAct: answer(Your answer to the question should be put in '
    'this pair of parentheses)\n\nIf the output is too long, I will truncate it. The truncated '
    'output is not complete. You have to deal with the truncating problem by yourself. '
    'Attention, your bash code should not contain any input operation. Once again, you should '
    'take only exact one of the three actions in each turn.\n\nNow, my problem is:\n\n'
    'tell me how many files are in the directory "/etc"?')
OS_EXPECTED_LAST = {
    1: "Stock logs are shown in /usr/stock.log. The last two columns are stock index and count. "
       "Tell me how many times Bob bought a stock.",
    89: "As a student, you are requested to find the total number of files and directories "
        "inside a specific directory, including its subdirectories. The output should be an "
        "integer representing the total count without any extra information. The given "
        'directory will be named "project_directory".',
    169: "Stock logs are shown in /usr/stock.log. The last two columns are stock index and count "
         "respectively. Tell me how many times Bob sold a stock.",
}


def _os_samples() -> list[dict]:
    path = DATA / "cycleqd-official" / "os_search_samples.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder is not mounted here)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("index", sorted(OS_EXPECTED_LAST))
def test_os_problem_is_the_official_one(index):
    sample = next(s for s in _os_samples() if s["index"] == index)
    built = ab.os_problem(sample["config"]["config"]["description"])
    assert len(built) == 7 and built[0] == {"role": "user", "content": OS_FIRST}
    assert [m["role"] for m in built] == ["user", "assistant"] * 3 + ["user"]
    assert built[1]["content"] == ("Think: To count the files in /etc, I need to print all the "
                                   "files in it.\n\nAct: bash\n\n```bash\nls /etc\n```")
    assert built[4]["content"] == "The output of the OS:\n220"
    assert built[6]["content"] == ("Now, I will start a new problem in a new OS. My problem "
                                   "is:\n\n" + OS_EXPECTED_LAST[index])


def test_os_problem_rebuilds_every_stored_official_problem():
    samples = _os_samples()
    assert len(samples) == 110
    assert all(ab.os_problem(s["config"]["config"]["description"]) == s["problem"]
               for s in samples)


def test_os_limits_and_observation():
    assert (ab.OS_MAX_ROUND, ab.OS_REPEATS, ab.OS_COMMAND_TIMEOUT_S) == (5, 5, 5.0)
    assert ab.os_observation("") == "The output of the OS is empty."
    assert ab.os_observation("ok\n") == "The output of the OS:\n\nok\n"
    long = "x" * 801
    assert ab.os_observation(long) == \
        "The output of the OS:\n\n" + "x" * 780 + "\n[truncated because the output is too long]"
    assert ab.os_observation("x" * 800) == "The output of the OS:\n\n" + "x" * 800


def test_llama3_prompt_is_the_fishfarm_template():
    msgs = [{"role": "user", "content": " Hi \n"}, {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": "Go"}]
    assert ab.llama3_prompt(msgs) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOk.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGo<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
