// Secretless client authentication (README "Secretless"): the signing key the broker's
// `private_key_jwt` assertions are signed with, created here, and `Key Vault Crypto User` for
// the broker's identity on exactly that key (and on the keys of the listed certificates), so
// it can sign with them and read their public halves, never export them, and touch no other key.

param vaultName string
param principalId string

@description('Name of the signing key to create (empty: none).')
param keyName string

@description('RSA (2048 bits; RS256 or PS256) or EC (P-256; ES256).')
@allowed(['RSA', 'EC'])
param keyType string

@description('Create the key in an HSM (needs the Premium vault).')
param hsm bool

@description('Existing certificates (Entra certificate credentials) whose keys the broker signs with.')
param certificateNames array

var keyVaultCryptoUser = '12338af0-0e69-4776-bea7-57ae8d297424'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource signingKey 'Microsoft.KeyVault/vaults/keys@2023-07-01' = if (!empty(keyName)) {
  // checkov:skip=CKV_AZURE_40: the key rotates by its rotation policy (a new version a month before two years are up) instead of expiring; an expired key would stop every token fetch
  // checkov:skip=CKV_AZURE_112: HSM-backed keys need the Premium vault: set signingKeyHsm to true for them
  parent: vault
  name: empty(keyName) ? 'unused' : keyName
  properties: {
    kty: hsm ? '${keyType}-HSM' : keyType
    keySize: keyType == 'RSA' ? 2048 : null
    curveName: keyType == 'EC' ? 'P-256' : null
    // Sign and verify only: the key can neither decrypt nor wrap, and is never exportable.
    keyOps: ['sign', 'verify']
    attributes: {
      enabled: true
      exportable: false
    }
    rotationPolicy: {
      attributes: { expiryTime: 'P2Y' }
      lifetimeActions: [
        {
          trigger: { timeBeforeExpiry: 'P30D' }
          action: { type: 'rotate' }
        }
        {
          trigger: { timeBeforeExpiry: 'P30D' }
          action: { type: 'notify' }
        }
      ]
    }
  }
}

resource signer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(keyName)) {
  name: guid(vault.id, 'keys', keyName, principalId, keyVaultCryptoUser)
  scope: signingKey
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultCryptoUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// A certificate's key has the certificate's name. Reading the certificate's public part
// (`Key Vault Certificate User` on the certificate itself) is granted by the command in the
// README: ARM has no resource type for a certificate to scope an assignment to.
resource certificateKeys 'Microsoft.KeyVault/vaults/keys@2023-07-01' existing = [for certificateName in certificateNames: {
  parent: vault
  name: certificateName
}]

resource certificateSigners 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (certificateName, i) in certificateNames: {
  name: guid(vault.id, 'certificates', certificateName, principalId, keyVaultCryptoUser)
  scope: certificateKeys[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultCryptoUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output keyName string = keyName
