// API Management in front of backends that need tokens from the broker: named values for the
// broker's URL, audience and function key (a Key Vault reference, never a plain value), the
// broker's API imported from its OpenAPI document, and the policy fragment backends include.

param name string
param createNew bool
param location string
param tags object
param publisherEmail string
param brokerUrl string
param vaultName string
@description('Audience of caller tokens in the broker\'s `jwt` caller mode.')
param brokerAudience string = 'api://token-broker'
@secure()
param apimFunctionKey string
@description('When the function key secret expires; Key Vault then raises SecretNearExpiry, a reminder to roll the key.')
param functionKeyExpiry int

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource created 'Microsoft.ApiManagement/service@2023-05-01-preview' = if (createNew) {
  // checkov:skip=CKV_AZURE_107: the Consumption tier has no virtual network; use an existing Premium instance (apimMode existing) where one is required
  // checkov:skip=CKV_AZURE_174: API Management is the public gateway in front of the backends
  name: name
  location: location
  tags: tags
  sku: { name: 'Consumption', capacity: 0 }
  identity: { type: 'SystemAssigned' }
  properties: {
    publisherEmail: publisherEmail
    publisherName: 'token-broker'
  }
}

resource service 'Microsoft.ApiManagement/service@2023-05-01-preview' existing = {
  name: name
  dependsOn: [created]
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

// The function key lives in Key Vault; APIM reads it through its own identity.
resource functionKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'broker-function-key'
  properties: {
    value: apimFunctionKey
    contentType: 'Azure Functions function key (apim) for token-broker'
    attributes: {
      enabled: true
      exp: functionKeyExpiry
    }
  }
}

resource apimReadsKey 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(functionKeySecret.id, name, keyVaultSecretsUser)
  scope: functionKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: service.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource functionKey 'Microsoft.ApiManagement/service/namedValues@2023-05-01-preview' = {
  parent: service
  name: 'token-broker-function-key'
  dependsOn: [apimReadsKey]
  properties: {
    displayName: 'token-broker-function-key'
    secret: true
    keyVault: {
      secretIdentifier: '${vault.properties.vaultUri}secrets/${functionKeySecret.name}'
    }
  }
}

resource urlValue 'Microsoft.ApiManagement/service/namedValues@2023-05-01-preview' = {
  parent: service
  name: 'token-broker-url'
  properties: {
    displayName: 'token-broker-url'
    value: brokerUrl
  }
}

resource audienceValue 'Microsoft.ApiManagement/service/namedValues@2023-05-01-preview' = {
  parent: service
  name: 'token-broker-audience'
  properties: {
    displayName: 'token-broker-audience'
    value: brokerAudience
  }
}

resource brokerApi 'Microsoft.ApiManagement/service/apis@2023-05-01-preview' = {
  parent: service
  name: 'token-broker'
  properties: {
    displayName: 'token-broker'
    path: 'token-broker'
    protocols: ['https']
    serviceUrl: brokerUrl
    subscriptionRequired: true
    format: 'openapi'
    value: loadTextContent('../../openapi.yaml')
  }
}

resource brokerApiPolicy 'Microsoft.ApiManagement/service/apis/policies@2023-05-01-preview' = {
  parent: brokerApi
  name: 'policy'
  dependsOn: [functionKey]
  properties: {
    format: 'rawxml'
    value: loadTextContent('../apim/broker-api-policy.xml')
  }
}

resource fragment 'Microsoft.ApiManagement/service/policyFragments@2023-05-01-preview' = {
  parent: service
  name: 'token-broker'
  dependsOn: [functionKey, urlValue, audienceValue]
  properties: {
    description: 'Gets an access token for the backend from token-broker and sets Authorization: Bearer.'
    format: 'rawxml'
    value: loadTextContent('../apim/token-broker-fragment.xml')
  }
}
