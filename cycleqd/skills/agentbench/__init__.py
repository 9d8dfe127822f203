"""AgentBench agent skills (DB-Bench, OS interaction) and what they share.

Modules:
    data            DBItem / OSItem loaders and fixed splits, the multi-turn episode runner
    dbbench         DBBenchSkill: SQL episodes in a per-item database, the answer scorers
    os_interaction  OSInteractionSkill: shell episodes in a throw-away Debian machine
"""
