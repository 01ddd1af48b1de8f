// Host storage: the Functions runtime (AzureWebJobsStorage), the Flex deployment package, and the app's queues,
// tables and containers. Reached only with Entra ID: shared keys, SAS from keys and anonymous access are off.
param name string
param location string
param tags object
@description('Blob containers to create, the Flex deployment package container among them.')
param containers array
@description('Queues to create.')
param queues array
@description('Tables to create.')
param tables array
@description('Days after which run reports, batch pages and dead batches are deleted (they hold contact data).')
@minValue(1)
param retentionDays int = 30
@description('Resource id of the Log Analytics workspace the storage logs go to.')
param logAnalyticsId string
@description('Containers whose blobs the retention applies to (never the acknowledged state or the definitions).')
param retainedContainers array = [
  'reports'
  'batches'
  'dead'
]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration has no fixed outbound addresses a firewall could allow; every request needs an Entra ID token and a data role (shared keys are off).
  //checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35: the public endpoint stays on, access is identity-only and anonymous blob access is off.
  //checkov:skip=CKV_AZURE_206: locally redundant, the Functions host storage default: queued batches and run records are working state, and the next export snapshot rebuilds anything lost.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource blobContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for container in containers: {
    parent: blobService
    name: container
    properties: {
      publicAccess: 'None'
    }
  }
]

// Reports (rejected rows with masked addresses, the report), batch pages (the documents planned for a run) and
// dead batches (documents that could not be sent, kept for replay) are deleted retentionDays after their last
// change. The acknowledged state (`state`) and the definitions (`config`) are never deleted by age.
resource retention 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'deleteRunDataByAge'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [for container in retainedContainers: '${container}/']
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: retentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource storageQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queue in queues: {
    parent: queueService
    name: queue
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource storageTables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for table in tables: {
    parent: tableService
    name: table
  }
]

// Every read, write and delete of the blobs, queues and tables (who, from where, with which identity) in the Log
// Analytics workspace: the account holds contact data in run reports and queued batches.
var storageLogs = [
  {
    category: 'StorageRead'
    enabled: true
  }
  {
    category: 'StorageWrite'
    enabled: true
  }
  {
    category: 'StorageDelete'
    enabled: true
  }
]

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'storage-to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: logAnalyticsId
    logs: storageLogs
  }
}

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'storage-to-log-analytics'
  scope: queueService
  properties: {
    workspaceId: logAnalyticsId
    logs: storageLogs
  }
}

resource tableDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'storage-to-log-analytics'
  scope: tableService
  properties: {
    workspaceId: logAnalyticsId
    logs: storageLogs
  }
}

output name string = storage.name
