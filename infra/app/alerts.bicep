// Alerts that reach a person: an action group (email addresses as a parameter, none by default) and log search
// alert rules on the app's own signals (shared/runtime/signals.py writes `<event> <JSON>` trace records; each rule reads
// the JSON after the event name). tests/test_alerts.py checks that every field a rule reads is written by the app.
param name string
param location string
param tags object
@description('Resource id of the Application Insights component the app writes to.')
param appInsightsId string
@description('Email addresses the alerts go to; none by default (the rules still fire and show in the portal).')
param alertEmails array = []

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${name}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: take('sync${name}', 12)
    enabled: true
    emailReceivers: [for (address, i) in alertEmails: {
      name: 'email-${i}'
      emailAddress: address
      useCommonAlertSchema: true
    }]
  }
}

var rules = [
  {
    name: 'run-failed'
    description: 'A run ended failed or partially succeeded.'
    severity: 1
    frequency: 'PT5M'
    window: 'PT15M'
    query: 'traces | where message startswith "run_ended " | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | where tostring(r.status) in ("failed", "partially succeeded") | project timestamp, runId = tostring(r.runId), export = tostring(r.export), connection = tostring(r.connection), status = tostring(r.status), failed = toint(r.failed), deadBatches = toint(r.deadBatches)'
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'dead-batches'
    description: 'A batch failed on every delivery and was parked as dead (replay it: POST /api/runs/{id}/replay).'
    severity: 2
    frequency: 'PT5M'
    window: 'PT15M'
    query: 'traces | where message startswith "batch_dead " | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | project timestamp, runId = tostring(r.runId), export = tostring(r.export), connection = tostring(r.connection), batch = toint(r.batch), contacts = toint(r.contacts)'
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'export-not-synced'
    description: 'An enabled export has had no successful run for 26 hours.'
    severity: 2
    frequency: 'PT1H'
    window: 'P2D'
    query: 'let enabled = traces | where timestamp > ago(1h) and message startswith "exports_enabled " | top 1 by timestamp desc | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | mv-expand export = r.exports to typeof(string) | project export; let synced = traces | where timestamp > ago(26h) and message startswith "run_ended " | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | where tostring(r.status) == "succeeded" | project export = tostring(r.export); enabled | join kind=leftanti synced on export'
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'throttled'
    description: 'More than 5% of the requests to one Autopilot connection were answered 429 over 15 minutes.'
    severity: 3
    frequency: 'PT5M'
    window: 'PT15M'
    query: 'traces | where message startswith "batch_sent " | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | summarize requests = sum(toint(r.requests)), throttled = sum(toint(r.throttled)) by connection = tostring(r.connection) | where requests > 0 and 100.0 * throttled / requests > 5'
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    // The heartbeat: every timer tick writes exports_enabled. Without it export-not-synced sees no enabled export
    // and stays silent, so a timer that stopped (app stopped, deployment broken, host failing to start) would
    // otherwise go unnoticed.
    name: 'timer-silent'
    description: 'The timer has not ticked for 2 hours: no scheduled run starts (is the app running?).'
    severity: 1
    frequency: 'PT30M'
    window: 'PT2H'
    query: 'traces | where message startswith "exports_enabled " | extend r = parse_json(substring(message, indexof(message, " ") + 1)) | project timestamp, exports = r.exports'
    operator: 'LessThan'
    threshold: 1
  }
]

resource alertRules 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [
  for rule in rules: {
    name: '${rule.name}-${name}'
    location: location
    tags: tags
    properties: {
      displayName: '${rule.name} (${name})'
      description: rule.description
      severity: rule.severity
      enabled: true
      scopes: [
        appInsightsId
      ]
      evaluationFrequency: rule.frequency
      windowSize: rule.window
      criteria: {
        allOf: [
          {
            query: rule.query
            timeAggregation: 'Count'
            // Most rules fire on any row; the heartbeat on none.
            operator: rule.operator
            threshold: rule.threshold
            failingPeriods: {
              numberOfEvaluationPeriods: 1
              minFailingPeriodsToAlert: 1
            }
          }
        ]
      }
      actions: {
        actionGroups: [
          actionGroup.id
        ]
      }
    }
  }
]
