"""Coding skills (MBPP, HumanEval): data, code extraction, the sandboxed judge and the skill.

Modules:
    data      CodeProblem, loaders and fixed splits for MBPP / HumanEval
    skill     CodingSkill (prompting, extraction, scoring) and the extraction helpers
    judge     the two-sandbox judge (candidate calls recorded as plain data, then judged)
    wire      the plain-data wire format between the sandboxes
    _harness, _driver   scripts that run *inside* the sandboxes (never imported here)
"""
