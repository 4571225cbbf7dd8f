// The shared token tier (README, "Fleet: the shared cache"): Azure Managed Redis with
// Microsoft Entra authentication only (access keys disabled), TLS 1.2 at least on port 10000,
// every key written with an expiry (so volatile-lru only ever evicts tokens), and an access
// policy assignment that lets the broker's identity in as itself (user name = its object id).

param name string
param location string
param tags object
@description('Object (principal) id of the broker\'s managed identity.')
param principalId string
@description('Azure Managed Redis SKU; Balanced_B0 is the smallest.')
param skuName string

resource cluster 'Microsoft.Cache/redisEnterprise@2025-04-01' = {
  name: name
  location: location
  tags: tags
  sku: { name: skuName }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

resource database 'Microsoft.Cache/redisEnterprise/databases@2025-04-01' = {
  parent: cluster
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    // One endpoint that proxies to the shards: the broker's client needs no cluster mode.
    clusteringPolicy: 'EnterpriseCluster'
    evictionPolicy: 'VolatileLRU'
    accessKeysAuthentication: 'Disabled'
  }
}

resource brokerAccess 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2025-04-01' = {
  parent: database
  name: 'tokenbroker'
  properties: {
    accessPolicyName: 'default'
    user: { objectId: principalId }
  }
}

output hostName string = cluster.properties.hostName
output url string = 'rediss://${cluster.properties.hostName}:10000'
