// The Function App on Flex Consumption (Python 3.11), running as the user-assigned identity. Every app setting the
// code reads is set here, in siteConfig.appSettings, from parameters: nothing is set by hand after deployment, so a
// re-provision (which replaces the whole list) keeps a working app. No setting holds a key or a secret.
// Only properties Flex Consumption accepts: tests/test_infra.py holds the site and its settings against Microsoft's
// list of site properties and app settings that Flex rejects or ignores.
param name string
param planName string
param location string
param tags object
@description('Resource id of the user-assigned identity the app runs as.')
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param appInsightsName string
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int
@minValue(0)
@maxValue(1000)
param httpAlwaysReadyInstances int
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int
param exportSchedule string
@description('Blob (container/name) in host storage holding the export definitions.')
param exportsBlob string
param keyVaultUrl string
param apiKeySecretName string
param autopilotBaseUrl string
@description('Hosts (comma-separated) a connection\'s baseUrl in the definitions may name besides the platforms\' APIs: a proxy.')
param allowedApiHosts string = ''
param autopilotRequestsPerSecond string
@description('Days after which the records and batch outcomes of finished runs are deleted (the lifecycle rule in storage.bicep deletes their blobs).')
@minValue(1)
param retentionDays int
// No default and at least one character: when neither EXPORT_STORAGE_ACCOUNT_ID nor EXPORT_STORAGE_BLOB_URI is set,
// the deployment stops on this parameter instead of creating an app whose every run fails on a missing setting.
@minLength(1)
@description('Blob endpoint of the Customer Insights export account (https://<account>.blob.core.windows.net/), from EXPORT_STORAGE_ACCOUNT_ID or EXPORT_STORAGE_BLOB_URI. Empty means neither is set: run azd env set EXPORT_STORAGE_ACCOUNT_ID (or EXPORT_STORAGE_BLOB_URI) and azd provision again.')
param exportStorageBlobServiceUri string
@description('Client id of the Entra ID app registration the HTTP API accepts tokens for; empty keeps function keys.')
param apiEntraClientId string = ''
@description('The API registration\'s application id URI, the audience of its tokens (with apiEntraClientId).')
param apiIdentifierUri string = ''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225: zone redundancy on Flex Consumption exists only in some regions and needs always-ready instances; a batch sync that resumes from its queue after an outage does not need it.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

// Identity-based connections only. AzureWebJobsStorage serves the triggers and the app's own clients;
// EXPORT_STORAGE reads the customer's export container; AZURE_CLIENT_ID picks the identity for Key Vault.
// Set in siteConfig (not a sites/config resource) so that the settings and the site are one resource.
var hostStorageSettings = [
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: storage.properties.primaryEndpoints.blob
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: storage.properties.primaryEndpoints.queue
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: storage.properties.primaryEndpoints.table
  }
]
var exportStorageSettings = [
  {
    name: 'EXPORT_STORAGE__credential'
    value: 'managedidentity'
  }
  {
    name: 'EXPORT_STORAGE__clientId'
    value: identityClientId
  }
  {
    name: 'EXPORT_STORAGE__blobServiceUri'
    value: exportStorageBlobServiceUri
  }
]
var entraAuth = !empty(apiEntraClientId)
var appSettings = [
  {
    name: 'AZURE_CLIENT_ID'
    value: identityClientId
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identityClientId};Authorization=AAD'
  }
  {
    name: 'EXPORT_SCHEDULE'
    value: exportSchedule
  }
  {
    name: 'EXPORTS_BLOB'
    value: exportsBlob
  }
  {
    name: 'KEY_VAULT_URL'
    value: keyVaultUrl
  }
  {
    name: 'AUTOPILOT_API_KEY_SECRET_NAME'
    value: apiKeySecretName
  }
  {
    name: 'AUTOPILOT_BASE_URL'
    value: autopilotBaseUrl
  }
  {
    name: 'ALLOWED_API_HOSTS'
    value: allowedApiHosts
  }
  {
    name: 'AUTOPILOT_REQUESTS_PER_SECOND'
    value: autopilotRequestsPerSecond
  }
  {
    // Seconds to wait for Autopilot's answer; a timed-out upsert is retried (keyed by email, so safe).
    name: 'AUTOPILOT_TIMEOUT_SECONDS'
    value: '10'
  }
  {
    // Deliveries of a batch before its unsent rest is parked as a dead batch (replayable).
    name: 'AUTOPILOT_MAX_ATTEMPTS'
    value: '8'
  }
  {
    // Requests are spaced (1 + margin) / rate apart: raise it if Autopilot answers 429 to on-time requests.
    name: 'AUTOPILOT_RATE_MARGIN'
    value: '0.025'
  }
  {
    // Days a finished run's records, batch outcomes and planned acknowledgements are kept (the timer deletes them;
    // the lifecycle rule in storage.bicep deletes the run's blobs after as many days).
    name: 'RETENTION_DAYS'
    value: string(retentionDays)
  }
  {
    // How HTTP callers authenticate: 'function-key', or 'entra' when built-in authentication (authSettings
    // below) checks an Entra ID token first; the app then also requires the principal it forwards.
    name: 'API_AUTHENTICATION'
    value: entraAuth ? 'entra' : 'function-key'
  }
  {
    // Threads of the Python worker (shared/runtime/settings.py WORKER_THREADS says why 16; Azure's default is cores + 4).
    name: 'PYTHON_THREADPOOL_THREAD_COUNT'
    value: '16'
  }
]

// Scale (functionAppConfig.scaleAndConcurrency). Flex scales per function: the HTTP functions together as the
// group 'http', each other function (the queue trigger send_batch, the timer) alone on its own instances
// (learn.microsoft.com/azure/azure-functions/flex-consumption-plan#per-function-scaling). Whether
// maximumInstanceCount caps each group (REST API description, Azure/azure-rest-api-specs#45083, 2026-07-29) or
// all groups together (Flex team, Azure/azure-functions-host#10523, 2026-01-05) is stated both ways, and queued
// batches scale the queue trigger out, delayed ones included (its target-based scaling counts them).
// Always-ready instances belong to the group they are set for (flex-consumption-plan#always-ready-instances), so
// the HTTP API keeps httpAlwaysReadyInstances instances under either reading.
resource site 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_222: the HTTP API (start a run, read a run) is called from the operator's machine or scheduler with a function key over HTTPS (TLS 1.2); private access would need VNet integration and private endpoints, which this one-command deployment leaves out.
  //checkov:skip=CKV_AZURE_17: incoming client certificates would lock out the API's callers (curl, schedulers); they authenticate with function keys instead.
  //checkov:skip=CKV_AZURE_212: Flex Consumption has no fixed worker count (numberOfWorkers); it scales each trigger from zero up to maximumInstanceCount.
  //checkov:skip=CKV_AZURE_213: Flex Consumption does not support the App Service health check (healthCheckPath); host health shows in Application Insights.
  //checkov:skip=CKV_AZURE_78: Flex Consumption rejects siteConfig.ftpsState (Microsoft's Flex deprecations list: FTPS not supported); FTP is off through the ftp and scm basicPublishingCredentialsPolicies below (allow: false).
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      appSettings: concat(hostStorageSettings, exportStorageSettings, appSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: (httpAlwaysReadyInstances == 0) ? [] : [
          {
            name: 'http'
            instanceCount: httpAlwaysReadyInstances
          }
        ]
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Deployment goes through the Flex package container with the identity: no publishing profile, no basic auth.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = site.name
output uri string = 'https://${site.properties.defaultHostName}'

// Built-in authentication (Easy Auth), on when apiEntraClientId is given: every HTTP request needs an Entra ID
// token issued for that app registration (infra/app/entra.bicep), which only a principal assigned one of its app
// roles can get; others get 401 before any function runs. The app checks each route's role itself (the platform
// does not read the roles claim). Event Grid's deliveries are excluded: Event Grid calls the host's webhook with
// the host's own system key, not a token, and would otherwise get 401 on validation and on every event. So are
// the console's files ('/api/console/*': everything under that path; '/api/console/' too, the page itself, in case
// the wildcard wants at least one character after the slash): they hold no data, and a browser must load
// the page before it can sign in; every other /api/ route, the data the page reads, stays behind the token or the
// session cookie of a browser sign-in (/.auth/login/aad, registered in infra/app/entra.bicep).
// The app's HTTP functions then take no function key (API_AUTHENTICATION 'entra') and refuse a request without
// the authenticated principal the platform forwards.
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = if (entraAuth) {
  //checkov:skip=CKV_AZURE_13: this resource is the App Service Authentication checkov asks for; checkov reads every sites/config resource as the 'web' one.
  //checkov:skip=CKV_AZURE_63: a 'web' config property (HTTP logging), not an authsettingsV2 one; the site's requests are in Application Insights.
  //checkov:skip=CKV_AZURE_65: a 'web' config property (detailed error messages), not an authsettingsV2 one.
  //checkov:skip=CKV_AZURE_66: a 'web' config property (failed request tracing), not an authsettingsV2 one.
  //checkov:skip=CKV_AZURE_80: a 'web' config property (.NET Framework version); this is a Python app.
  //checkov:skip=CKV_AZURE_88: a 'web' config property (Azure Files mounts); the app keeps its data in blob, queue and table storage.
  //checkov:skip=CKV_AZURE_222: the same reason as on the site: the API stays on the public endpoint, here behind Entra ID tokens.
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: [
        '/runtime/webhooks/eventgrid'
        '/api/console/'
        '/api/console/*'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: apiEntraClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            apiIdentifierUri
            apiEntraClientId
          ]
        }
      }
    }
    // No token store: a browser's session cookie still carries the id_token's claims, roles included, which is
    // all the app reads (X-MS-CLIENT-PRINCIPAL); nothing calls another API on the user's behalf.
    login: {
      tokenStore: {
        enabled: false
      }
    }
  }
}
