// Mutual-TLS client certificates (docs/client-certificates.md): what the broker's identity
// needs for each kind of key, and no more. A certificate whose key stays in the vault gets
// `Key Vault Crypto User` on its key (the handshake's signature is made by Key Vault's sign);
// one whose key is exportable gets `Key Vault Secrets User` on its secret (key and chain),
// and nothing on its key. A certificate's key and secret have the certificate's name. Reading
// the certificate itself (`Key Vault Certificate User`) is granted by the command in the docs:
// ARM has no resource type for a certificate to scope an assignment to.

param vaultName string
param principalId string

@description('Certificates whose keys are not exportable: the broker signs with each key in Key Vault.')
param keyCertificateNames array

@description('Certificates whose keys are exportable: the broker reads each one\'s secret (key and chain).')
param exportableCertificateNames array

var keyVaultCryptoUser = '12338af0-0e69-4776-bea7-57ae8d297424'
var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource clientCertificateKeys 'Microsoft.KeyVault/vaults/keys@2023-07-01' existing = [for name in keyCertificateNames: {
  parent: vault
  name: name
}]

resource clientCertificateSigners 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in keyCertificateNames: {
  name: guid(vault.id, 'tls-certificates', name, principalId, keyVaultCryptoUser)
  scope: clientCertificateKeys[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultCryptoUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

resource clientCertificateSecrets 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = [for name in exportableCertificateNames: {
  parent: vault
  name: name
}]

resource clientCertificateReaders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in exportableCertificateNames: {
  name: guid(vault.id, 'tls-certificate-secrets', name, principalId, keyVaultSecretsUser)
  scope: clientCertificateSecrets[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]
