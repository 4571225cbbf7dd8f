// The operator's view of the broker: an Azure Monitor workbook and scheduled query alert rules
// over the Application Insights `traces` the broker's stdout becomes. A custom handler has no
// metrics channel of its own: the Functions host writes each line of its stdout as one `traces`
// row of category `Host.Function.Console` (`customDimensions.Category`), the line in `message`,
// so the queries keep that category (the host's own traces are not the broker's lines) and read
// `parse_json(message)`:
//
//   - audit records (target `audit`, message `token handed out`): `connection`, `caller`,
//     `scopes`, `cache`, `fingerprint`, `count` (tokens the record stands for; cache hits are
//     one record per caller and token every 5 s), and `audit records lost` lines (`dropped`);
//   - the `stats` line every `stats_interval_seconds` (target `stats`), counts since the
//     previous line: `requests`, `requests_by_status`, `errors_by_code`, `cache_hits`,
//     `cache_misses`, `cache_stale`, `token_fetches`, `token_fetches_by_result`,
//     `token_fetch_failures`, `token_fetch_p50_ms`/`p95`/`p99`/`max`, `key_vault_reads`,
//     `key_vault_failures`, `jwks_reloads`, `breakers_open`, `breakers_open_connections`,
//     `audit_dropped`, and with a shared tier `shared_hits`, `shared_misses`, `shared_waits`,
//     `shared_errors`, `shared_unreadable`, `shared_outages`;
//   - rotation events (target `rotation`).
//
// Percentiles in a `stats` line are per instance and period; the workbook shows the largest
// across instances, an upper bound of the fleet's.
//
// host.json keeps `Trace` out of Application Insights sampling, so every line arrives with
// `itemCount` 1. The sums still weigh each row by `itemCount` and count rows as `sum(itemCount)`,
// never `count()`: should traces ever be sampled again (host.json, or ingestion sampling on the
// Application Insights resource), a kept row stands for `itemCount` lines and the totals stay
// estimates of the whole instead of silently shrinking.

param name string
param location string
param tags object
@description('Application Insights component the broker logs to.')
param appInsightsId string
@description('E-mail address alerts are sent to; empty: the rules fire in the portal only.')
param alertEmail string = ''

// Every query starts from the broker's JSON lines: its stdout, not the host's own traces.
var consoleTraces = 'traces | where tostring(customDimensions.Category) == "Host.Function.Console"'
var lines = '${consoleTraces} | where message startswith "{" | extend line = parse_json(message)'
var auditLines = '${lines} | where tostring(line.target) == "audit" and tostring(line.message) == "token handed out"'
var statsLines = '${lines} | where tostring(line.target) == "stats"'

var queries = {
  tokensByConnection: '${auditLines} | summarize tokens = sum(tolong(line["count"]) * itemCount) by bin(timestamp, 5m), connection = tostring(line.connection) | render timechart'
  tokensByCaller: '${auditLines} | summarize tokens = sum(tolong(line["count"]) * itemCount), records = sum(itemCount) by connection = tostring(line.connection), caller = tostring(line.caller), scopes = tostring(line.scopes) | order by tokens desc'
  auditLost: '${lines} | where tostring(line.target) == "audit" and tostring(line.message) == "audit records lost" | summarize tokens_lost = sum(tolong(line.dropped) * itemCount) by bin(timestamp, 5m) | render timechart'
  hitRatio: '${statsLines} | summarize hits = sum(tolong(line.cache_hits) * itemCount), misses = sum(tolong(line.cache_misses) * itemCount), stale = sum(tolong(line.cache_stale) * itemCount) by bin(timestamp, 5m) | extend hit_ratio = iff(hits + misses + stale == 0, real(null), todouble(hits) / (hits + misses + stale)) | project timestamp, hit_ratio | render timechart'
  fetchLatency: '${statsLines} | where tolong(line.token_fetches) > 0 | summarize p50_ms = max(tolong(line.token_fetch_p50_ms)), p95_ms = max(tolong(line.token_fetch_p95_ms)), p99_ms = max(tolong(line.token_fetch_p99_ms)) by bin(timestamp, 5m) | render timechart'
  fetchResults: '${statsLines} | mv-expand kind=array result = line.token_fetches_by_result | summarize fetches = sum(tolong(result[1]) * itemCount) by bin(timestamp, 5m), result = tostring(result[0]) | render columnchart kind=stacked'
  errorsByCode: '${statsLines} | mv-expand kind=array error = line.errors_by_code | summarize requests = sum(tolong(error[1]) * itemCount) by bin(timestamp, 5m), code = tostring(error[0]) | render columnchart kind=stacked'
  breakersAndKeyVault: '${statsLines} | summarize breakers_open = max(tolong(line.breakers_open)), key_vault_reads = sum(tolong(line.key_vault_reads) * itemCount), key_vault_failures = sum(tolong(line.key_vault_failures) * itemCount), jwks_reloads = sum(tolong(line.jwks_reloads) * itemCount) by bin(timestamp, 5m) | render timechart'
  sharedTier: '${statsLines} | where isnotnull(line.shared_hits) | summarize shared_hits = sum(tolong(line.shared_hits) * itemCount), shared_misses = sum(tolong(line.shared_misses) * itemCount), shared_errors = sum(tolong(line.shared_errors) * itemCount), shared_outages = sum(tolong(line.shared_outages) * itemCount) by bin(timestamp, 5m) | render timechart'
  rotations: '${lines} | where tostring(line.target) == "rotation" | extend text = tostring(line.message) | where text has "will be read again" | project timestamp, event = extract(@"^([A-Za-z.]+):", 1, text), text | order by timestamp desc'
}

var panels = [
  { title: 'Tokens handed out per connection (sum of audit count)', query: queries.tokensByConnection, size: 0 }
  { title: 'Tokens per connection, caller and scopes', query: queries.tokensByCaller, size: 0 }
  { title: 'Cache hit ratio', query: queries.hitRatio, size: 1 }
  { title: 'Token endpoint latency (largest per-instance percentile)', query: queries.fetchLatency, size: 1 }
  { title: 'Token endpoint fetches by result', query: queries.fetchResults, size: 1 }
  { title: 'Errors by code', query: queries.errorsByCode, size: 1 }
  { title: 'Open circuit breakers, Key Vault reads and failures, JWKS reloads', query: queries.breakersAndKeyVault, size: 1 }
  { title: 'Shared (Redis) tier: hits, misses, errors, outages', query: queries.sharedTier, size: 1 }
  { title: 'Audit records lost (tokens)', query: queries.auditLost, size: 1 }
  { title: 'Secret rotations', query: queries.rotations, size: 1 }
]

var headerItems = [
  {
    type: 1
    content: {
      json: '## token-broker\nTokens handed out (audit `count`), the cache, the token endpoint, errors and rotations, from the broker\'s `audit` and `stats` lines in `traces`.'
    }
    name: 'intro'
  }
  {
    type: 9
    content: {
      version: 'KqlParameterItem/1.0'
      parameters: [
        {
          id: 'time-range'
          version: 'KqlParameterItem/1.0'
          name: 'TimeRange'
          type: 4
          isRequired: true
          value: { durationMs: 86400000 }
          typeSettings: {
            selectableValues: [
              { durationMs: 3600000 }
              { durationMs: 14400000 }
              { durationMs: 86400000 }
              { durationMs: 604800000 }
            ]
          }
        }
      ]
    }
    name: 'parameters'
  }
]

var panelItems = [
  for (panel, i) in panels: {
    type: 3
    content: {
      version: 'KqlItem/1.0'
      query: panel.query
      size: panel.size
      title: panel.title
      timeContextFromParameter: 'TimeRange'
      queryType: 0
      resourceType: 'microsoft.insights/components'
    }
    name: 'panel-${i}'
  }
]

var workbookContent = {
  version: 'Notebook/1.0'
  items: concat(headerItems, panelItems)
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, name, 'token-broker-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'token-broker (${name})'
    category: 'workbook'
    sourceId: appInsightsId
    serializedData: string(workbookContent)
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${name}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'tokbroker'
    enabled: true
    emailReceivers: [
      { name: 'operator', emailAddress: alertEmail, useCommonAlertSchema: true }
    ]
  }
}

var actionGroups = empty(alertEmail) ? [] : [actionGroup.id]

// Each rule sums a `stats` field over its window; any value above the threshold fires.
var rules = [
  {
    key: 'token-endpoint-failures'
    description: 'Token fetches failed (token_fetch_failures in the stats lines): the identity provider refused, failed or was unreachable. The broker\'s warnings name the connection.'
    severity: 2
    query: '${statsLines} | summarize failures = sum(tolong(line.token_fetch_failures) * itemCount)'
    measure: 'failures'
  }
  {
    key: 'secret-unavailable'
    description: 'Callers were answered secret_unavailable: a client secret could not be read from Key Vault (missing, disabled, access revoked, Key Vault down).'
    severity: 1
    query: '${statsLines} | summarize answers = sum(tolong(line.errors_by_code.secret_unavailable) * itemCount)'
    measure: 'answers'
  }
  {
    key: 'breaker-open'
    description: 'A connection\'s circuit breaker is open (breakers_open in the stats lines; breakers_open_connections names it): its token endpoint failed repeatedly and calls fail fast.'
    severity: 1
    query: '${statsLines} | summarize open = max(tolong(line.breakers_open))'
    measure: 'open'
  }
]

resource alerts 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [
  for rule in rules: {
    name: 'token-broker-${rule.key}-${name}'
    location: location
    tags: tags
    properties: {
      displayName: 'token-broker: ${rule.key}'
      description: rule.description
      severity: rule.severity
      enabled: true
      scopes: [appInsightsId]
      evaluationFrequency: 'PT5M'
      windowSize: 'PT5M'
      criteria: {
        allOf: [
          {
            query: rule.query
            timeAggregation: 'Total'
            metricMeasureColumn: rule.measure
            operator: 'GreaterThan'
            threshold: 0
            failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
          }
        ]
      }
      autoMitigate: true
      actions: { actionGroups: actionGroups }
    }
  }
]

output workbookId string = workbook.id
output actionGroupIds array = actionGroups
