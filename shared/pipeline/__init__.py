"""The run lifecycle: planning a run (planner, runs), its batches as queue messages (batch_messages), sending them
(sender, delivery), cancelling (cancels), reports (reports) and clean-up (retention). Imports the packages below it
and shared.services; within shared/, only the HTTP API imports it.
"""
