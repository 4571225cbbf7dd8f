// The broker's side of the API Management wiring, in the broker's resource group: the host
// function key API Management calls with, the same value as the Key Vault secret its named value
// references, and read access to exactly that secret for API Management's identity.

param functionAppName string
param keyVaultName string
@secure()
@minLength(32)
param functionKey string
@allowed(['apim-a', 'apim-b'])
param functionKeyName string
@description('Expiry of the secret, in seconds since the epoch; pinned by the caller.')
param functionKeyExpiry int
@description('Object (principal) id of API Management\'s system-assigned identity.')
@minLength(36)
param apimPrincipalId string

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

// A host-level function key: valid for every function of the app, `function-token` included.
// The other name (apim-a or apim-b) is left as it is, so a rolled key and the previous one both
// work until the previous one is deleted.
resource hostKey 'Microsoft.Web/sites/host/functionKeys@2023-12-01' = {
  name: '${functionAppName}/default/${functionKeyName}'
  properties: {
    name: functionKeyName
    value: functionKey
  }
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Same value and attributes on a redeploy: Key Vault keeps the current version.
resource functionKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'broker-function-key'
  properties: {
    value: functionKey
    contentType: 'Azure Functions host key ${functionKeyName} of ${functionAppName}'
    attributes: {
      enabled: true
      exp: functionKeyExpiry
    }
  }
}

resource apimReadsKey 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(functionKeySecret.id, apimPrincipalId, keyVaultSecretsUser)
  scope: functionKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: apimPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Versionless: API Management follows the secret's latest version (within 4 hours, or at once
// on a refresh of the named value).
output secretUri string = '${vault.properties.vaultUri}secrets/${functionKeySecret.name}'
output apimPrincipalId string = apimPrincipalId
output hostKeyName string = hostKey.properties.name
