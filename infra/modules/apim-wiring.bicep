// API Management's side of the wiring: the named values the `token-broker` fragment uses, the
// fragment itself (the variant for the broker's caller mode), and optionally a sample backend
// API that includes it. No API here fronts the broker: its answers are access tokens, and an API
// in front of it would hand them to every subscriber of that API.

param apimName string
param brokerUrl string
@description('Versionless Key Vault secret identifier of the function key.')
param functionKeySecretUri string
@allowed(['none', 'jwt'])
param callerMode string
@description('In jwt mode: the Application ID URI of the broker\'s app registration.')
param brokerAudience string
param sampleBackendUrl string
@description('Use the sample policy that caches tokens (only where the instance has a cache).')
param sampleTokenCaching bool

var fragmentXml = callerMode == 'jwt' ? loadTextContent('../apim/token-broker-fragment-jwt.xml') : loadTextContent('../apim/token-broker-fragment.xml')
var samplePolicyXml = sampleTokenCaching ? loadTextContent('../apim/sample-backend-policy-cached.xml') : loadTextContent('../apim/sample-backend-policy.xml')

resource service 'Microsoft.ApiManagement/service@2023-05-01-preview' existing = {
  name: apimName
}

resource functionKeyValue 'Microsoft.ApiManagement/service/namedValues@2023-05-01-preview' = {
  parent: service
  name: 'token-broker-function-key'
  properties: {
    displayName: 'token-broker-function-key'
    secret: true
    keyVault: {
      secretIdentifier: functionKeySecretUri
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

// Only the jwt variant of the fragment names it; API Management refuses a policy that names a
// value that does not exist, and an empty value is refused too.
resource audienceValue 'Microsoft.ApiManagement/service/namedValues@2023-05-01-preview' = if (callerMode == 'jwt') {
  parent: service
  name: 'token-broker-audience'
  properties: {
    displayName: 'token-broker-audience'
    value: brokerAudience
  }
}

resource fragment 'Microsoft.ApiManagement/service/policyFragments@2023-05-01-preview' = {
  parent: service
  name: 'token-broker'
  dependsOn: [functionKeyValue, urlValue, audienceValue]
  properties: {
    description: 'Gets an access token for the backend from token-broker and sets Authorization: Bearer.'
    format: 'xml'
    value: fragmentXml
  }
}

// A backend API that gets its Authorization header from the fragment: every operation, any
// path, forwarded to `sampleBackendUrl` with a token of the connection `contoso`.
resource sampleApi 'Microsoft.ApiManagement/service/apis@2023-05-01-preview' = if (!empty(sampleBackendUrl)) {
  parent: service
  name: 'token-broker-sample'
  properties: {
    displayName: 'token-broker sample backend'
    path: 'token-broker-sample'
    protocols: ['https']
    serviceUrl: sampleBackendUrl
    subscriptionRequired: true
  }
}

resource sampleOperations 'Microsoft.ApiManagement/service/apis/operations@2023-05-01-preview' = [for method in ['GET', 'POST', 'PUT', 'PATCH', 'DELETE']: if (!empty(sampleBackendUrl)) {
  parent: sampleApi
  name: toLower('any-${method}')
  properties: {
    displayName: '${method} any path'
    method: method
    urlTemplate: '/*'
  }
}]

resource samplePolicy 'Microsoft.ApiManagement/service/apis/policies@2023-05-01-preview' = if (!empty(sampleBackendUrl)) {
  parent: sampleApi
  name: 'policy'
  dependsOn: [fragment]
  properties: {
    format: 'xml'
    value: samplePolicyXml
  }
}

output apimName string = service.name
output sampleApiPath string = empty(sampleBackendUrl) ? '' : 'token-broker-sample'
