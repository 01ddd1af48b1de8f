// Entry point for `azd up`: one resource group holding everything the sync app needs, secure by default.
// Hand-written resources (no registry modules) so that `make test` can check every security property offline:
// tests/test_infra.py parses these files and checkov scans them without reaching a registry.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; with the subscription and location it seeds every resource name.')
param environmentName string

@minLength(1)
@description('Region for every resource; it must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

// Every request to Autopilot takes a time slot from one rate budget (an entity in the `ratebudget` table) that
// all instances share, so more instances never push the app past autopilotRequestsPerSecond; they only absorb
// planning, retries and bursts of batches faster.
@minValue(1)
@maxValue(1000)
@description('Most instances Flex Consumption may run at once.')
param maximumInstanceCount int = 4

@allowed([
  512
  2048
  4096
])
@description('Memory of each instance, in MB.')
param instanceMemoryMB int = 2048

@description('Resource id of the storage account Customer Insights exports to. Empty: no role is granted and the EXPORT_STORAGE app settings must be set by hand after deployment.')
param exportStorageAccountResourceId string = ''

@description('NCRONTAB schedule on which the app looks for new export snapshots.')
param exportSchedule string = '0 */15 * * * *'

@description('Autopilot REST API base URL.')
param autopilotBaseUrl string = 'https://api2.autopilothq.com/v1'

@description('Requests per second the whole app may send to Autopilot (a number; fractions allowed).')
param autopilotRequestsPerSecond string = '5'

@secure()
@description('Autopilot API key. Empty (the default): the secret is not created; set it after deployment with az keyvault secret set.')
param autopilotApiKey string = ''

@description('Object id of the person (or CI principal) running azd. Empty: no role for them.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Kind of principal principalId names.')
param principalType string = 'User'

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var functionAppName = 'func-api-${resourceToken}'

// The host storage account: the Functions runtime, the deployment package, and the app's own state.
// storage.bicep creates these; rbac.bicep grants on them; function.bicep points the app settings at them.
var hostStorage = {
  containers: [
    'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
    'batches'
    'reports'
    'config'
    'dead'
  ]
  queues: [
    'autopilot-batches'
    'autopilot-batches-poison'
  ]
  tables: [
    'runs'
    'batches'
    'contactstate'
    'ratebudget'
  ]
}
var deploymentContainerName = hostStorage.containers[0]
var configContainerName = 'config'
var reportsContainerName = 'reports'
var apiKeySecretName = 'autopilot-api-key'

resource rg 'Microsoft.Resources/resourceGroups@2022-09-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-api-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    containers: hostStorage.containers
    queues: hostStorage.queues
    tables: hostStorage.tables
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    apiKeySecretName: apiKeySecretName
    autopilotApiKey: autopilotApiKey
  }
}

module functionApp 'app/function.bicep' = {
  name: 'function'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    exportSchedule: exportSchedule
    exportsBlob: '${configContainerName}/exports.json'
    keyVaultUrl: keyVault.outputs.uri
    apiKeySecretName: apiKeySecretName
    autopilotBaseUrl: autopilotBaseUrl
    autopilotRequestsPerSecond: autopilotRequestsPerSecond
    exportStorageAccountName: exportStorageAccountName
  }
}

// /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Storage/storageAccounts/<name>
var exportStorageAccountName = empty(exportStorageAccountResourceId) ? '' : last(split(exportStorageAccountResourceId, '/'))
var exportStorageSubscriptionId = empty(exportStorageAccountResourceId) ? subscription().subscriptionId : split(exportStorageAccountResourceId, '/')[2]
var exportStorageResourceGroup = empty(exportStorageAccountResourceId) ? rg.name : split(exportStorageAccountResourceId, '/')[4]

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    appPrincipalId: identity.outputs.principalId
    hostStorageAccountName: storage.outputs.name
    configContainerName: configContainerName
    reportsContainerName: reportsContainerName
    keyVaultName: keyVault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    exportStorageAccountName: exportStorageAccountName
    exportStorageSubscriptionId: exportStorageSubscriptionId
    exportStorageResourceGroup: exportStorageResourceGroup
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = functionApp.outputs.name
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = functionApp.outputs.uri
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AUTOPILOT_API_KEY_SECRET_NAME string = apiKeySecretName
