// The vault holding the OAuth client secrets: RBAC authorization (no access policies), soft
// delete and purge protection, audit logs (who read which secret) to Log Analytics, and an
// optional private endpoint.

param name string
param location string
param tags object
param workspaceId string
param publicNetworkAccess bool
param privateEndpointSubnetId string
param deployerPrincipalId string
param deployerPrincipalType string

var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

var publicNetworkAccessValue = publicNetworkAccess ? 'Enabled' : 'Disabled'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: the firewall is open only in the public-access mode (see networkAcls); the private mode denies all but the private endpoint
  // checkov:skip=CKV_AZURE_189: public access is a parameter (keyVaultPublicNetworkAccess) because Flex Consumption without a virtual network needs it
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: publicNetworkAccessValue
    networkAcls: {
      // Functions are not a "trusted service" for the firewall bypass: without a virtual
      // network the broker reaches the vault over its public endpoint, and every read is
      // authorized per secret by RBAC. With public access off, only the private endpoint.
      defaultAction: publicNetworkAccess ? 'Allow' : 'Deny'
      bypass: 'AzureServices'
    }
  }
}

resource audit 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: workspaceId
    logs: [
      { categoryGroup: 'audit', enabled: true }
    ]
    metrics: [
      { category: 'AllMetrics', enabled: true }
    ]
  }
}

// The deployer puts secret values (and rotates them); the broker's identity only reads.
resource deployerOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, deployerPrincipalId, keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

resource privateEndpoint 'Microsoft.Network/privateEndpoints@2023-11-01' = if (!empty(privateEndpointSubnetId)) {
  name: 'pe-${name}'
  location: location
  tags: tags
  properties: {
    subnet: { id: privateEndpointSubnetId }
    privateLinkServiceConnections: [
      {
        name: 'vault'
        properties: {
          privateLinkServiceId: vault.id
          groupIds: ['vault']
        }
      }
    ]
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
