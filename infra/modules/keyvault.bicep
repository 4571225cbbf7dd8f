// The vault holding the OAuth client secrets: RBAC authorization (no access policies), soft
// delete and purge protection, audit logs (who read which secret) to Log Analytics.
//
// The vault is reached over its public endpoint, and every read is authorized per secret by
// RBAC. A private vault is not offered: it needs the Function App integrated into a virtual
// network, a private endpoint with a private DNS zone group for privatelink.vaultcore.azure.net,
// and a way for the deployer to put secrets from inside that network, none of which these
// templates build.

param name string
param location string
param tags object
param workspaceId string
param deployerPrincipalId string
param deployerPrincipalType string
@description('Premium SKU: needed for HSM-backed keys.')
param premium bool = false

var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: Flex Consumption without virtual network integration reaches the vault over its public endpoint; every read is authorized per secret by RBAC
  // checkov:skip=CKV_AZURE_189: same reason: no virtual network, so public access stays on; access is by Entra ID and per-secret role assignments only
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: premium ? 'premium' : 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      // Functions are not a "trusted service" for the firewall bypass: without a virtual
      // network the broker reaches the vault over its public endpoint.
      defaultAction: 'Allow'
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

output name string = vault.name
output uri string = vault.properties.vaultUri
