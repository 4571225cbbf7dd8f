// API Management calling token-broker for its backends, deployed after `main.bicep` and the
// package (the README's "Step by step", step 6). Deploy it into API Management's resource group.
//
//   az deployment group create -g <apim rg> -n token-broker-apim -f infra/apim.bicep \
//      -p infra/apim.parameters.json -p @apim-key.parameters.json
//
// What it creates:
// - with `apimMode=new`, a Consumption instance with a system-assigned identity;
// - in the broker's resource group: the host function key `functionKeyName` (apim-a or apim-b)
//   holding `functionKey`, the Key Vault secret `broker-function-key` with the same value and a
//   pinned expiry, and Key Vault Secrets User on that one secret for the instance's identity;
// - in API Management: the named values the fragment uses (the function key as a Key Vault
//   reference, never a plain value), the `token-broker` policy fragment, and optionally a sample
//   backend API that includes it.
// No API Management API fronts the broker itself: backends get tokens through the fragment only.
//
// Rolling the function key uses the two host keys alternately (README, "Rolling the API
// Management function key"): deploy the new key to the other `functionKeyName`, refresh the
// named value, then delete the old host key.

targetScope = 'resourceGroup'

@description('Create a Consumption instance (`new`) or use an existing one (`existing`, which must have its system-assigned identity turned on).')
@allowed(['new', 'existing'])
param apimMode string

@description('Name of the API Management instance (new or existing): letters, digits and hyphens, starting with a letter.')
@minLength(1)
@maxLength(50)
param apimName string

@description('Region of a new instance.')
param location string = resourceGroup().location

@description('Publisher e-mail, required when creating API Management.')
param publisherEmail string = 'platform@example.com'

@description('Resource group of the broker (main.bicep\'s deployment).')
param brokerResourceGroup string = resourceGroup().name

@description('The broker\'s Function App: main.bicep\'s `functionAppName` output.')
param functionAppName string

@description('The broker\'s vault: main.bicep\'s `keyVaultName` output.')
param keyVaultName string

@description('The function key API Management calls the broker with: 32 to 128 characters, for example `openssl rand -hex 32`. Required: without it every call would be refused with 401.')
@secure()
@minLength(32)
@maxLength(128)
param functionKey string

@description('Host key that holds `functionKey`. Two names alternate, so a new key works before API Management has picked it up and the old one is deleted only afterwards.')
@allowed(['apim-a', 'apim-b'])
param functionKeyName string = 'apim-a'

@description('When the function key expires in Key Vault, as an ISO 8601 date-time (for example 2027-06-30T00:00:00Z). Pinned, so a redeploy does not write a new secret version; Key Vault raises SecretNearExpiry 30 days before, the reminder to roll the key.')
@minLength(10)
param functionKeyExpiry string

@description('The broker\'s caller mode (`[callers] mode` in broker.toml): `none` ships the fragment without a managed identity token; `jwt` ships the variant that adds one for `brokerAudience`.')
@allowed(['none', 'jwt'])
param brokerCallerMode string = 'none'

@description('In `jwt` mode: the Application ID URI of the broker\'s app registration (`api://<application id>`), the broker\'s `[callers] audience`. Unused in `none` mode.')
param brokerAudience string = ''

@description('Base URL of a backend to create the sample API for (it gets tokens of the connection `contoso`); empty for no sample API.')
param sampleBackendUrl string = ''

@description('Cache tokens in API Management in the sample API. Only where the instance has a cache: an existing instance of a tier with a built-in cache (not Consumption) or with an external cache configured. Ignored for a new (Consumption) instance, which has none.')
param sampleTokenCaching bool = false

module instance 'modules/apim-instance.bicep' = if (apimMode == 'new') {
  name: 'apim-instance'
  params: {
    name: apimName
    location: location
    tags: { application: 'token-broker' }
    publisherEmail: publisherEmail
  }
}

// An existing instance is read, never changed: its identity is the one that reads the key.
resource existingInstance 'Microsoft.ApiManagement/service@2023-05-01-preview' existing = {
  name: apimName
}

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
  scope: resourceGroup(brokerResourceGroup)
}

module brokerAccess 'modules/apim-broker-access.bicep' = {
  name: 'apim-broker-access'
  scope: resourceGroup(brokerResourceGroup)
  params: {
    functionAppName: functionAppName
    keyVaultName: keyVaultName
    functionKey: functionKey
    functionKeyName: functionKeyName
    functionKeyExpiry: dateTimeToEpoch(functionKeyExpiry)
    // Taken from the instance this deployment created, or from the existing one.
    apimPrincipalId: apimMode == 'new' ? instance.outputs.principalId : existingInstance.identity.principalId
  }
}

module wiring 'modules/apim-wiring.bicep' = {
  name: 'apim-wiring'
  params: {
    apimName: apimMode == 'new' ? instance.outputs.name : existingInstance.name
    brokerUrl: 'https://${site.properties.defaultHostName}'
    functionKeySecretUri: brokerAccess.outputs.secretUri
    callerMode: brokerCallerMode
    brokerAudience: brokerAudience
    sampleBackendUrl: sampleBackendUrl
    sampleTokenCaching: apimMode == 'existing' && sampleTokenCaching
  }
}

output apimName string = wiring.outputs.apimName
output apimPrincipalId string = brokerAccess.outputs.apimPrincipalId
output functionKeyName string = functionKeyName
output sampleApiPath string = wiring.outputs.sampleApiPath
