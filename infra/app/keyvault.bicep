// Key Vault for the Autopilot API key: RBAC authorization (no access policies), soft delete and purge
// protection. The key's value comes from a secure parameter or is set after deployment; it is never in the repo.
param name string
param location string
param tags object
param apiKeySecretName string
@description('Resource id of the Log Analytics workspace the audit log goes to.')
param logAnalyticsId string
@secure()
@description('Autopilot API key; empty: the secret is not created here (set it with az keyvault secret set).')
param autopilotApiKey string = ''

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109: Flex Consumption without VNet integration has no fixed outbound addresses a firewall rule could allow; every request needs an Entra ID token and a data-plane role (RBAC authorization).
  //checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109: the public endpoint stays on, access is identity-only.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource apiKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(autopilotApiKey)) {
  //checkov:skip=CKV_AZURE_41: an Autopilot API key does not expire; an expiry date on the secret would only stop the sync that day. Rotation is documented (README: rotating the API key).
  //checkov:skip=CKV_AZURE_114: false positive: checkov reads a conditional resource's body one level too deep; contentType is set below and tests/test_infra.py asserts it.
  parent: vault
  name: apiKeySecretName
  properties: {
    value: autopilotApiKey
    contentType: 'text/plain'
  }
}

// Key Vault's audit log (every secret read, by which identity) in the Log Analytics workspace.
resource audit 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
