// Key Vault's events to the broker's `function-rotation` function: the vault's Event Grid system
// topic and one subscription whose destination is that function (endpoint type AzureFunction,
// so Event Grid authenticates to the Functions host itself and no key appears here).
//
// Deploy it after the package: Event Grid validates the destination function when it creates
// the subscription. A vault has at most one system topic; if one already exists for this vault,
// add the subscription to that topic instead.
//
// Only new versions reach the function: a rotation is a new version of a secret, key or
// certificate. Near-expiry and expiry events announce nothing new; they are reminders for an
// operator, and go to Azure Monitor as alerts (the `MonitorAlert` subscriptions below).
//
// On Flex Consumption the Event Grid function runs on instances of its own, not on the ones that
// serve /api/token: with the shared cache it passes the event on through Redis, and answers 5xx
// when it could not, so that Event Grid delivers it again (infra/README.md, "Rotation events");
// without it, token-serving instances pick a new version up by their secret cache TTL (the
// README's "Rolling a secret").

param vaultName string
param functionAppName string
@description('The vault\'s region: a system topic lives where its source does.')
param location string
param tags object
@description('Action groups the Key Vault near-expiry, expiry and dropped-event alerts notify (from the operations module).')
param alertActionGroups array = []

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: 'evgt-${vaultName}'
  location: location
  tags: tags
  properties: {
    source: vault.id
    topicType: 'Microsoft.KeyVault.vaults'
  }
}

// Event Grid retries a delivery the function failed (a 5xx, or no answer within 30 s) at 10 s,
// 30 s, 1, 5, 10 and 30 min, 1, 3 and 6 h, then every 12 h. A redelivery costs little (instances
// drop the secret and tokens and fetch again), and a late one still deletes shared tokens minted
// with the old version, which can live up to a day: the subscription keeps trying for the whole
// day, the longest Event Grid allows; the time to live ends it before the attempts run out
// (about a dozen in 24 h). No dead-letter destination: an expired rotation event has nothing
// left to replay (every instance has read the new version by then); `eventsDropped` below says
// that it happened.
resource toRotationFunction 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'function-rotation'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${site.id}/functions/function-rotation'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      // New versions of secrets, keys and certificates: the rotations.
      includedEventTypes: [
        'Microsoft.KeyVault.SecretNewVersionCreated'
        'Microsoft.KeyVault.KeyNewVersionCreated'
        'Microsoft.KeyVault.CertificateNewVersionCreated'
      ]
    }
    // Retried for a whole day, the longest Event Grid allows (see above); no dead letter.
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}

// The Key Vault near-expiry alert: Event Grid hands the vault's near-expiry events straight to
// Azure Monitor as alerts (destination `MonitorAlert`), about 30 days before a secret, key or
// certificate with an expiry date expires, so an operator rotates it before callers see
// `upstream_rejected`. Event based, not a log query: Key Vault raises these events itself, and
// its audit log has no near-expiry record to query.
resource nearExpiryAlert 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: topic
  name: 'near-expiry-alert'
  properties: {
    destination: {
      endpointType: 'MonitorAlert'
      properties: {
        severity: 'Sev2'
        description: 'token-broker: a Key Vault secret, key or certificate expires soon; rotate it (README "Rolling a secret").'
        actionGroups: alertActionGroups
      }
    }
    eventDeliverySchema: 'CloudEventSchemaV1_0'
    filter: {
      includedEventTypes: [
        'Microsoft.KeyVault.SecretNearExpiry'
        'Microsoft.KeyVault.KeyNearExpiry'
        'Microsoft.KeyVault.CertificateNearExpiry'
      ]
    }
  }
}

// Expired: a secret, key or certificate past its expiry date, which it was set to replace by;
// more urgent than the near-expiry reminder.
resource expiredAlert 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: topic
  name: 'expired-alert'
  properties: {
    destination: {
      endpointType: 'MonitorAlert'
      properties: {
        severity: 'Sev1'
        description: 'token-broker: a Key Vault secret, key or certificate has expired; replace it (README "Rolling a secret").'
        actionGroups: alertActionGroups
      }
    }
    eventDeliverySchema: 'CloudEventSchemaV1_0'
    filter: {
      includedEventTypes: [
        'Microsoft.KeyVault.SecretExpired'
        'Microsoft.KeyVault.KeyExpired'
        'Microsoft.KeyVault.CertificateExpired'
      ]
    }
  }
}

// Events the topic gave up on: a rotation that never reached `function-rotation` within its
// time to live (so the shared cache never heard of it), or an alert event Azure Monitor never
// took. Event Grid's `DroppedEventCount` metric of the system topic, any subscription.
resource eventsDropped 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'token-broker-events-dropped-${vaultName}'
  location: 'global'
  tags: tags
  properties: {
    description: 'token-broker: Event Grid dropped a Key Vault event (DroppedEventCount of the vault\'s system topic): a rotation that never reached function-rotation, or an alert that never reached Azure Monitor. Check the topic\'s delivery metrics and the function\'s log.'
    severity: 2
    enabled: true
    scopes: [topic.id]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'dropped'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DroppedEventCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    autoMitigate: true
    actions: [for group in alertActionGroups: { actionGroupId: group }]
  }
}

output systemTopicName string = topic.name
output subscriptionName string = toRotationFunction.name
