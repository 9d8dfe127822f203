"""Coding skills (MBPP, HumanEval): data, code extraction, the sandboxed judge and the skill.

Modules:
    data      CodeProblem, loaders and fixed splits for MBPP / HumanEval
    skill     CodingSkill (prompts, cache key, scoring, pass@1 and chunk sub-scores)
    extract   extract_code / sanitize_code: the solution out of a model reply
    execute   prepare_program / build_program, run_program(s): a reply made into a judged program
    judge     the two-sandbox judge (candidate calls recorded as plain data, then judged)
    plusjudge the official MBPP+ judge (EvalPlus base inputs vs the canonical's outputs)
    official  the official CycleQD MBPP+ prompt and decoding
    wire      the plain-data wire format between the sandboxes
    _harness, _driver   scripts that run *inside* the sandboxes (never imported here)
"""
