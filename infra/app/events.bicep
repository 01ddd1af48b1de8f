// Runs that start when Customer Insights writes a model.json: the export account's Event Grid system topic sends its
// BlobCreated events for .../model.json to the app's Event Grid-triggered function snapshot_written. Deployed by
// infra/hooks/postdeploy.sh into the export account's resource group after `azd deploy`: the subscription names the
// function, which exists only once the code is deployed.
//
// An Event Grid trigger, not a blob trigger with the EventGrid source: a blob trigger needs Storage Blob Data Owner
// and Storage Queue Data Contributor on the account it watches (it writes its poison queue there), and this account
// is the customer's export account, on which the app holds Storage Blob Data Reader only.

@description('Name of the Customer Insights export storage account, in this resource group.')
param exportStorageAccountName string

@description('The export account\'s Event Grid system topic: its existing one (an account has at most one), or a new one of this name.')
param topicName string

@description('The Function App, and where it lives.')
param functionAppName string
param functionAppResourceGroup string
param functionAppSubscriptionId string = subscription().subscriptionId

var functionName = 'snapshot_written'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: exportStorageAccountName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
  scope: resourceGroup(functionAppSubscriptionId, functionAppResourceGroup)
}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: topicName
  location: account.location
  properties: {
    source: account.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: '${functionAppName}-model-json'
  properties: {
    destination: {
      // Event Grid calls the function through its resource id: no key in a URL.
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionApp.id}/functions/${functionName}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      // Every container: the app matches the blob to the exports' source.container and prefix itself.
      subjectBeginsWith: '/blobServices/default/containers/'
      subjectEndsWith: '/model.json'
    }
    retryPolicy: {
      // Event Grid's defaults: an app that is down for a while still gets the event; the timer is the backstop.
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}
