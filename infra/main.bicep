// token-broker on Azure: a Linux Flex Consumption Function App (runtime `custom`) with a
// user-assigned managed identity, identity-based storage, Application Insights on Log Analytics,
// a Key Vault (RBAC, soft delete, purge protection, audit logs) whose listed secrets the
// broker's identity may read one by one, and, once the package is deployed, the vault's Event
// Grid system topic subscribed to `function-rotation`, and, with `sharedCache`, an Azure Managed
// Redis the instances share tokens and rotations through. API Management is wired separately,
// by `apim.bicep`.
//
//   az deployment group create -g <rg> -n token-broker -f infra/main.bicep -p infra/main.parameters.json
//
// Deploy three times on first use (the README's "Step by step"): once to create the vault; then,
// after putting the secret values, with `clientSecretNames` listing them, which grants per-secret
// read access; then, after deploying the package, with `subscribeRotationEvents=true`.

targetScope = 'resourceGroup'

@description('Short name used to derive resource names: letters and digits, starting with a letter. Lower-cased here, since storage account and vault names must be lower case.')
@minLength(3)
@maxLength(12)
param baseName string = 'tokbroker'

@description('Azure region; must support Flex Consumption.')
param location string = resourceGroup().location

@description('Key Vault secrets the broker serves (names as in broker.toml `key_vault_secret`). Each must already exist: the broker\'s identity gets `Key Vault Secrets User` on exactly these.')
param clientSecretNames array = []

@description('App settings referenced by `${NAME}` in broker.toml, besides the ones this template sets itself (for example CONTOSO_CLIENT_ID, CONTOSO_TOKEN_URL).')
param connectionSettings object = {}

@description('Object ID of the principal that deploys and puts secret values (user or pipeline): it gets `Key Vault Secrets Officer` on the vault.')
param deployerPrincipalId string

@description('Principal type of the deployer.')
@allowed(['User', 'ServicePrincipal', 'Group'])
param deployerPrincipalType string = 'User'

@description('Secretless (README "Secretless"): name of a signing key to create for `private_key_jwt` connections (`client_assertion_key = { key_vault_key = "..." }`); empty for none. The broker\'s identity gets `Key Vault Crypto User` on this key alone.')
param signingKeyName string = ''

@description('Type of the signing key: RSA 2048 (RS256, PS256) or EC P-256 (ES256).')
@allowed(['RSA', 'EC'])
param signingKeyType string = 'RSA'

@description('Create the signing key in an HSM; the vault then uses the Premium SKU.')
param signingKeyHsm bool = false

@description('Existing Key Vault certificates used as Entra certificate credentials (`key_vault_certificate`): the identity gets `Key Vault Crypto User` on each one\'s key.')
param signingCertificateNames array = []

@description('Mutual-TLS client certificates (docs/client-certificates.md) whose keys stay in the vault: the identity gets `Key Vault Crypto User` on each one\'s key.')
param clientCertificateNames array = []

@description('Mutual-TLS client certificates whose keys are exportable: the identity gets `Key Vault Secrets User` on each one\'s secret.')
param exportableClientCertificateNames array = []

@description('E-mail address the operations alerts (token endpoint failures, secret_unavailable, open circuit breakers, Key Vault near expiry) are sent to; empty: they fire in the portal only.')
param alertEmail string = ''

@description('Subscribe `function-rotation` to the vault\'s secret, key and certificate events. Set it only once the package is deployed: Event Grid checks that the destination function exists when it creates the subscription.')
param subscribeRotationEvents bool = false

@description('Deploy the shared token tier (Azure Managed Redis, Entra authentication only). Put the encryption key in the vault first, as secret `sharedCacheKeySecretName` (base64 of 32 random bytes: `openssl rand -base64 32`), and add the [shared_cache] block to broker.toml.')
param sharedCache bool = false

@description('Key Vault secret holding the shared cache\'s encryption key; the broker\'s identity may read it when sharedCache is on.')
param sharedCacheKeySecretName string = 'token-cache-key'

@description('Azure Managed Redis SKU of the shared cache.')
param sharedCacheSku string = 'Balanced_B0'

@description('Token requests one instance takes at once before Flex Consumption adds an instance; Flex\'s own default at 512 MB is 4. The reasoning and how to tune it: infra/README.md, "HTTP concurrency".')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 100

@description('Keep one `function-rotation` instance always ready (billed around the clock) instead of starting one when an event arrives: infra/README.md, "Rotation events".')
param rotationAlwaysReady bool = false

// Storage account names allow lower-case letters and digits only; vault names are
// case-insensitive but conventionally lower case. Every name below derives from `base`.
var base = toLower(baseName)
var suffix = uniqueString(resourceGroup().id, base)
var tags = { application: 'token-broker' }

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    name: '${base}-${suffix}'
    location: location
    tags: tags
  }
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${base}-id-${suffix}'
  location: location
  tags: tags
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: take('${replace(base, '-', '')}st${suffix}', 24)
    location: location
    tags: tags
    principalId: identity.properties.principalId
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: take('${base}-kv-${suffix}', 24)
    location: location
    tags: tags
    workspaceId: monitoring.outputs.workspaceId
    deployerPrincipalId: deployerPrincipalId
    deployerPrincipalType: deployerPrincipalType
    premium: signingKeyHsm
  }
}

module secretAccess 'modules/secret-access.bicep' = {
  name: 'secret-access'
  params: {
    vaultName: vault.outputs.name
    secretNames: sharedCache ? union(clientSecretNames, [sharedCacheKeySecretName]) : clientSecretNames
    principalId: identity.properties.principalId
  }
}

module redis 'modules/shared-cache.bicep' = if (sharedCache) {
  name: 'shared-cache'
  params: {
    name: '${base}-redis-${suffix}'
    location: location
    tags: tags
    principalId: identity.properties.principalId
    skuName: sharedCacheSku
  }
}

// What broker.toml's [shared_cache] block reads: the Redis URL, and the identity's object id,
// which is its Redis user name under Entra authentication.
var sharedCacheSettings = sharedCache ? {
  REDIS_URL: redis.outputs.url
  AZURE_PRINCIPAL_ID: identity.properties.principalId
} : {}


module signingAccess 'modules/signing-access.bicep' = if (!empty(signingKeyName) || !empty(signingCertificateNames)) {
  name: 'signing-access'
  params: {
    vaultName: vault.outputs.name
    principalId: identity.properties.principalId
    keyName: signingKeyName
    keyType: signingKeyType
    hsm: signingKeyHsm
    certificateNames: signingCertificateNames
  }
}

module clientCertificateAccess 'modules/client-certificate-access.bicep' = if (!empty(clientCertificateNames) || !empty(exportableClientCertificateNames)) {
  name: 'client-certificate-access'
  params: {
    vaultName: vault.outputs.name
    principalId: identity.properties.principalId
    keyCertificateNames: clientCertificateNames
    exportableCertificateNames: exportableClientCertificateNames
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: '${base}-func-${suffix}'
    location: location
    tags: tags
    identityId: identity.id
    identityClientId: identity.properties.clientId
    identityPrincipalId: identity.properties.principalId
    storageAccountName: storage.outputs.name
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    appInsightsId: monitoring.outputs.appInsightsId
    keyVaultUri: vault.outputs.uri
    connectionSettings: union(connectionSettings, sharedCacheSettings)
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    rotationAlwaysReady: rotationAlwaysReady
  }
}

// The operator's workbook and alert rules over the broker's audit and stats lines.
module operations 'modules/operations.bicep' = {
  name: 'operations'
  params: {
    name: '${base}-${suffix}'
    location: location
    tags: tags
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmail: alertEmail
  }
}

// After the package is deployed: Key Vault events to `function-rotation`, and the vault's
// near-expiry events to Azure Monitor as alerts.
module rotationEvents 'modules/rotation-events.bicep' = if (subscribeRotationEvents) {
  name: 'rotation-events'
  params: {
    vaultName: vault.outputs.name
    functionAppName: functionApp.outputs.name
    location: location
    tags: tags
    alertActionGroups: operations.outputs.actionGroupIds
  }
}

output functionAppName string = functionApp.outputs.name
output functionAppUrl string = 'https://${functionApp.outputs.defaultHostName}'
output keyVaultName string = vault.outputs.name
output keyVaultUri string = vault.outputs.uri
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
output redisUrl string = sharedCache ? redis.outputs.url : ''
output deploymentContainerUrl string = storage.outputs.deploymentContainerUrl
output workbookId string = operations.outputs.workbookId
