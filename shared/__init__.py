"""The app's code, by concern. Imports go one way, each package using only those listed before it
(tests/test_layout.py checks it):

- runtime: settings, storage connections, table limits, the blocking pool, request combining, telemetry signals;
- source: Customer Insights' CDM exports, the export definitions, mapping a row to a contact;
- state: the acknowledged state of each export at its destination, and the run and batch records;
- destinations: the Autopilot and Ortto clients behind one interface, their shared transport, API keys and the
  rate budget;
- services (a module): the clients one Function instance builds, once;
- pipeline: a run's lifecycle, from planning to sending, cancels, reports and retention;
- http_api, api_answers and api_roles (modules): the HTTP API, the shape of its answers and who may call it;
  beside them, what the operator console's routes need: connection_check (connections, their keys, a test call),
  definitions_edit (editing the definitions document) and source_browse (an export container's segments and
  columns).

function_app.py, at the repository's top, only hands each trigger over to these.
"""
