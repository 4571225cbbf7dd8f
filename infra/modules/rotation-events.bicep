// Key Vault's events to the broker's `function-rotation` function: the vault's Event Grid system
// topic and one subscription whose destination is that function (endpoint type AzureFunction,
// so Event Grid authenticates to the Functions host itself and no key appears here).
//
// Deploy it after the package: Event Grid validates the destination function when it creates
// the subscription. A vault has at most one system topic; if one already exists for this vault,
// add the subscription to that topic instead.
//
// On Flex Consumption the Event Grid function runs on instances of its own, not on the ones that
// serve /api/token: what the event changes there does not reach the token-serving instances,
// which pick a new secret version up by their secret cache TTL (see the README's "Rolling a
// secret"). The subscription is still what a shared tier would fan the event out from.

param vaultName string
param functionAppName string
@description('The vault\'s region: a system topic lives where its source does.')
param location string
param tags object
@description('Action groups the Key Vault near-expiry alert notifies (from the operations module).')
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
      // New versions, near expiry and expiry of secrets, keys and certificates.
      includedEventTypes: [
        'Microsoft.KeyVault.SecretNewVersionCreated'
        'Microsoft.KeyVault.SecretNearExpiry'
        'Microsoft.KeyVault.SecretExpired'
        'Microsoft.KeyVault.KeyNewVersionCreated'
        'Microsoft.KeyVault.KeyNearExpiry'
        'Microsoft.KeyVault.KeyExpired'
        'Microsoft.KeyVault.CertificateNewVersionCreated'
        'Microsoft.KeyVault.CertificateNearExpiry'
        'Microsoft.KeyVault.CertificateExpired'
      ]
    }
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

output systemTopicName string = topic.name
output subscriptionName string = toRotationFunction.name
