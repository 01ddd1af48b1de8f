"""The run lifecycle: planning a run (planner, runs), its batches as queue messages (batch_messages), sending them
(sender, delivery), cancelling (cancels), reports (reports) and clean-up (retention). Imports every other package
of shared/ and shared.services; only shared.http_api and function_app import it.
"""
