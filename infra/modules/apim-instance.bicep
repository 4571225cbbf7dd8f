// A new API Management instance for the broker's fragment: the Consumption tier, with a
// system-assigned identity (it reads the broker's function key from Key Vault).
//
// Consumption has no built-in cache: policies that cache do nothing here unless an external
// cache is configured, so nothing in this deployment caches tokens on a new instance.

param name string
param location string
param tags object
param publisherEmail string

resource service 'Microsoft.ApiManagement/service@2023-05-01-preview' = {
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

output name string = service.name
output principalId string = service.identity.principalId
