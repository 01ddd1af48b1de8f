// One grant on the customer's export account, deployed into that account's resource group. Called only from
// rbac.bicep, which chooses the role (Storage Blob Data Reader) and the principal (the app's identity).
param storageAccountName string
param principalId string
param roleDefinitionId string

resource exportStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource exportReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(exportStorage.id, principalId, roleDefinitionId)
  scope: exportStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleDefinitionId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
