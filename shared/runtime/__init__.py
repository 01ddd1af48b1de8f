"""What every part runs on: the app settings, the storage connections and Azure's table limits, the thread pool for
blocking calls, request combining, and the telemetry signals. Imports nothing else of shared/.
"""
