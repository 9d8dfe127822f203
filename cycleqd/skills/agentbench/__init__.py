"""AgentBench agent skills (DB-Bench, OS interaction) and what they share.

Modules:
    data            DBItem / OSItem loaders and fixed splits
    episode         Episode, run_lockstep, evaluate_cached: the multi-turn runner both skills share
    dbbench         DBBenchSkill: SQL episodes in a per-item database, the answer scorers
    os_interaction  OSInteractionSkill: shell episodes in a throw-away Debian machine
"""
