// Runs that start when Customer Insights writes a model.json: the export account's Event Grid system topic sends its
// BlobCreated events for .../model.json to the app's Event Grid-triggered function snapshot_written. Deployed by the
// postdeploy hook (infra/hooks/postdeploy.sh, .ps1) after `azd deploy`, into the resource group of the account's
// system topic: the one it has (an account has at most one, in any group of its subscription), referenced as it is,
// never re-PUT (that would reset its tags and identity); or a new one in the account's own group. The subscription
// names the function, which exists only once the code is deployed.
//
// An Event Grid trigger, not a blob trigger with the EventGrid source: a blob trigger needs Storage Blob Data Owner
// and Storage Queue Data Contributor on the account it watches (it writes its poison queue there), and this account
// is the customer's export account, on which the app holds Storage Blob Data Reader only.

@description('Resource id of the Customer Insights export storage account.')
param exportStorageAccountId string

@description('The account\'s Event Grid system topic, in this resource group: its existing one, or the one to create.')
param topicName string

@description('True when the account has no system topic yet: it is created here, in the account\'s resource group.')
param createTopic bool = false

@description('The Function App, and where it lives.')
param functionAppName string
param functionAppResourceGroup string
param functionAppSubscriptionId string = subscription().subscriptionId

var functionName = 'snapshot_written'
var accountPath = split(exportStorageAccountId, '/')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountPath[8]
  scope: resourceGroup(accountPath[2], accountPath[4])
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
  scope: resourceGroup(functionAppSubscriptionId, functionAppResourceGroup)
}

resource newTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = if (createTopic) {
  name: topicName
  location: account.location
  properties: {
    source: account.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: topicName
}

resource modelJsonSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: '${functionAppName}-model-json'
  dependsOn: [
    newTopic
  ]
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
