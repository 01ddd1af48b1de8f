// Entry point for `azd up`: one resource group holding everything the sync app needs, secure by default.
// Hand-written resources (no registry modules) so that `make test` can check every security property offline:
// tests/test_infra.py parses these files and checkov scans them without reaching a registry.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; with the subscription and location it seeds every resource name.')
param environmentName string

// Regions that offer Flex Consumption, so that another region fails at once instead of at site creation. Taken
// 2026-11-30 from Microsoft's list in Azure-Samples/azure-functions-flex-consumption-samples, IaC/bicep/main.bicep
// ("Last updated: July 2025", commit b5a5697; the sample dropped the list on 2025-12-17), without the canary region
// eastus2euap, which only early-access subscriptions can use. Flex keeps adding regions: when
// `az functionapp list-flexconsumption-locations` names one missing here, add it.
@minLength(1)
@description('Region for every resource; it must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'japanwest'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

// Every request to Autopilot takes a time slot from one rate budget (an entity in the `ratebudget` table) that
// all instances share, so more instances never push the app past autopilotRequestsPerSecond; they only absorb
// planning, retries and bursts of batches faster. 40 is the lowest maximum Flex Consumption accepts in every
// region ("Scale: the lowest maximum scale is currently 40", learn.microsoft.com/azure/azure-functions/
// flex-consumption-plan#considerations; the Flex samples use @minValue(40)); lower values are a preview in a few
// regions only (Azure/azure-functions-host#10523, 2026-01-05). A maximum is a ceiling, not a reservation: on-demand
// instances are billed only while they execute.
@minValue(40)
@maxValue(1000)
@description('Most on-demand instances Flex Consumption may run at once (40 to 1000).')
param maximumInstanceCount int = 40

// One instance kept running for the HTTP functions, so that queued batches, which scale the queue trigger out, never
// leave the API (start a run, read a run) without an instance. It is billed around the clock at the always-ready
// baseline rate; 0 turns it off (see docs/deploy-azure.md).
@minValue(0)
@maxValue(1000)
@description('Always-ready instances for the HTTP functions (scale group http); 0: none.')
param httpAlwaysReadyInstances int = 1

@allowed([
  512
  2048
  4096
])
@description('Memory of each instance, in MB.')
param instanceMemoryMB int = 2048

// The Customer Insights export account, in one of two ways (EXPORT_STORAGE_ACCOUNT_ID wins when both are set):
// its resource id, and the deployment grants the app's identity Storage Blob Data Reader on it; or, when the person
// running azd cannot grant roles there, its blob endpoint, and the account's owner grants that role (README).
// Neither: the deployment stops on the function module's exportStorageBlobServiceUri.
@description('Resource id of the storage account Customer Insights exports to (EXPORT_STORAGE_ACCOUNT_ID); the app gets Storage Blob Data Reader on it.')
param exportStorageAccountResourceId string = ''

@description('Blob endpoint of the export account, https://<account>.blob.core.windows.net/ (EXPORT_STORAGE_BLOB_URI); used only without exportStorageAccountResourceId, and then the account owner grants the read role.')
param exportStorageBlobUri string = ''

@description('True: the HTTP API takes Entra ID tokens instead of function keys; the deployment declares its app registration with the roles Exports.Admin, Exports.Operator and Exports.Reader, assignment required (infra/app/entra.bicep).')
param apiEntraAuth bool = false

@description('Email addresses the alerts go to, separated by commas; none by default (the alerts still fire and show in the portal).')
param alertEmails string = ''

@description('Days after which run reports, batch pages, dead batches and the records of finished runs (they hold contact data) are deleted.')
@minValue(1)
param retentionDays int = 30

@description('NCRONTAB schedule on which the app looks for new export snapshots.')
param exportSchedule string = '0 */15 * * * *'

@description('Autopilot REST API base URL.')
param autopilotBaseUrl string = 'https://api2.autopilothq.com/v1'

@description('Hosts (comma-separated) a connection\'s baseUrl in the export definitions may name besides Autopilot\'s and Ortto\'s APIs (a proxy); empty: none.')
param allowedApiHosts string = ''

@description('Requests per second the whole app may send to Autopilot (a number; fractions allowed).')
param autopilotRequestsPerSecond string = '5'

@secure()
@description('Autopilot API key. Empty (the default): the secret is not created; set it after deployment with az keyvault secret set.')
param autopilotApiKey string = ''

// azd (1.17.1 and later) fills both from the account it is signed in with, on every provision, and ignores values
// set with `azd env set AZURE_PRINCIPAL_ID` / `AZURE_PRINCIPAL_TYPE`: User, or ServicePrincipal when signed in with
// `azd auth login --client-id` (Azure/azure-dev cli/azd/pkg/infra/provisioning/current_principal_id_provider.go).
@description('Object id of the account running azd (filled by azd from the login). Empty: no role for them.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Kind of principal principalId names (filled by azd from the login: User or ServicePrincipal).')
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
    'state'
  ]
  queues: [
    'autopilot-plans'
    'autopilot-plans-poison'
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

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    name: resourceToken
    location: location
    tags: tags
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmails: empty(alertEmails) ? [] : split(replace(alertEmails, ' ', ''), ',')
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
    retentionDays: retentionDays
    logAnalyticsId: monitoring.outputs.logAnalyticsId
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
    logAnalyticsId: monitoring.outputs.logAnalyticsId
  }
}

module apiRegistration 'app/entra.bicep' = if (apiEntraAuth) {
  name: 'api-registration'
  scope: rg
  params: {
    uniqueName: 'ci-autopilot-api-${resourceToken}'
    displayName: 'Customer Insights sync API (${environmentName})'
    functionAppName: functionAppName // its sign-in callback; the name is known before the app exists
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
    httpAlwaysReadyInstances: httpAlwaysReadyInstances
    instanceMemoryMB: instanceMemoryMB
    exportSchedule: exportSchedule
    exportsBlob: '${configContainerName}/exports.json'
    keyVaultUrl: keyVault.outputs.uri
    apiKeySecretName: apiKeySecretName
    autopilotBaseUrl: autopilotBaseUrl
    allowedApiHosts: allowedApiHosts
    autopilotRequestsPerSecond: autopilotRequestsPerSecond
    retentionDays: retentionDays
    exportStorageBlobServiceUri: exportStorageBlobServiceUri
    apiEntraClientId: apiRegistration.?outputs.clientId ?? ''
    apiIdentifierUri: apiRegistration.?outputs.identifierUri ?? ''
  }
}

// /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Storage/storageAccounts/<name>
var exportStorageAccountName = empty(exportStorageAccountResourceId) ? '' : last(split(exportStorageAccountResourceId, '/'))
var exportStorageAccountBlobUri = 'https://${exportStorageAccountName}.blob.${environment().suffixes.storage}/'
var exportStorageBlobServiceUri = empty(exportStorageAccountName) ? exportStorageBlobUri : exportStorageAccountBlobUri
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
output AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = functionApp.outputs.uri
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AUTOPILOT_API_KEY_SECRET_NAME string = apiKeySecretName
// With apiEntraAuth: what a caller asks a token for (`az account get-access-token --resource ...`), and the service
// principal roles are assigned on.
output API_IDENTIFIER_URI string = apiRegistration.?outputs.identifierUri ?? ''
output API_SERVICE_PRINCIPAL_ID string = apiRegistration.?outputs.servicePrincipalId ?? ''
