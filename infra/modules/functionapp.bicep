// The broker: a Linux Flex Consumption Function App with runtime `custom`, HTTPS only,
// TLS 1.2+, FTP and basic publishing credentials off, a user-assigned identity for storage,
// Application Insights and Key Vault, and the app settings broker.toml reads.

param name string
param location string
param tags object
param identityId string
param identityClientId string
param identityPrincipalId string
param storageAccountName string
param deploymentContainerUrl string
param appInsightsConnectionString string
param appInsightsId string
param keyVaultUri string
@description('Extra app settings referenced by broker.toml.')
param connectionSettings object
@description('HTTP requests one instance takes at once before Flex Consumption adds an instance (infra/README.md, "HTTP concurrency").')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int
@description('Keep one instance of `function-rotation` always ready (infra/README.md, "Rotation events").')
param rotationAlwaysReady bool

var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

// One source of truth for what the broker reads; a test checks broker.toml against it.
var brokerSettings = {
  TOKEN_BROKER_CONFIG: 'broker.toml'
  KEY_VAULT_URI: keyVaultUri
  AZURE_CLIENT_ID: identityClientId
  RUST_LOG: 'info'
}
var platformSettings = {
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
}
var allSettings = union(connectionSettings, brokerSettings, platformSettings)

// Always ready: one instance of the HTTP group (token requests sit on APIM's hot path) and, when
// asked, one of `function-rotation`, which Flex scales on instances of its own
// (`function:<name>`; `http` names the group of every HTTP function).
var httpAlwaysReady = [{ name: 'http', instanceCount: 1 }]
var rotationAlwaysReadyInstances = rotationAlwaysReady ? [{ name: 'function:function-rotation', instanceCount: 1 }] : []

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: Flex Consumption zone redundancy exists only in some regions; turn on zoneRedundant where the region offers it
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: callers (API Management Consumption, services) reach the broker publicly; every call needs a function key, and in jwt mode an Entra token
  // checkov:skip=CKV_AZURE_17: callers authenticate with function keys and Entra tokens; API Management Consumption cannot present a client certificate per backend call
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales per request and has no worker count; a minimum is set with alwaysReady instead
  // checkov:skip=CKV_AZURE_213: Flex Consumption has no App Service health check; the Functions host probes the custom handler itself
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [for setting in items(allSettings): { name: setting.key, value: setting.value }]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        // Per function group: the HTTP group and `function-rotation` each scale up to it.
        maximumInstanceCount: 40
        instanceMemoryMB: 512
        alwaysReady: concat(httpAlwaysReady, rotationAlwaysReadyInstances)
        // Flex's default at 512 MB is 4 requests in flight per instance; the broker waits on
        // the identity provider without using the CPU, so it says how many it takes.
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: { name: 'custom', version: '1.0' }
    }
  }
}

// Deployments authenticate with Entra ID, never with publishing passwords.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: site
  name: 'ftp'
  properties: { allow: false }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: site
  name: 'scm'
  properties: { allow: false }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: last(split(appInsightsId, '/'))
}

// Entra ID ingestion into Application Insights (local authentication is off).
resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsightsId, identityPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output name string = site.name
output defaultHostName string = site.properties.defaultHostName
