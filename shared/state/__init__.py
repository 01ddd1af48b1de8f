"""What the app remembers: the acknowledged state of each export at its destination (state_lines, state_store) and
the run and batch records (run_records). Imports shared.runtime only.
"""
