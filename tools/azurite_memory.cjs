// Loaded into an in-memory Azurite by tools/azurite.py (node --require). Azurite sweeps the storage of consumed queue
// messages at its start and every 60 s; its in-memory store deletes them one at a time, each with a scan of every
// stored extent, on the one event loop that serves blobs, queues and tables. After a few thousand messages that
// blocked every storage call for seconds (5.6 s and 14 s in benchmark runs); Azure Storage has no such pause. An
// in-memory Azurite lives for one benchmark, so its sweeps come an hour apart: consumed messages stay in memory
// meanwhile (a few MB for a 100,000-profile run).
const path = require("path");

const constants = require(path.join(__dirname, "..", "node_modules", "azurite", "dist", "src", "queue", "utils",
  "constants"));
constants.DEFAULT_GC_INTERVAL_MS = 60 * 60 * 1000;
