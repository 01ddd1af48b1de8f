# azd runs this after `azd deploy` on Windows (azure.yaml hooks; postdeploy.sh is the Linux and macOS twin, and says
# why this is a hook): it subscribes the app's Event Grid trigger to the export account's model.json writes
# (infra/app/events.bicep). Run it again with `azd hooks run postdeploy`.
$ErrorActionPreference = 'Stop'

$accountId = $env:EXPORT_STORAGE_ACCOUNT_ID
if (-not $accountId) {
    Write-Host 'EXPORT_STORAGE_ACCOUNT_ID is not set: no Event Grid subscription; runs start on the timer (EXPORT_SCHEDULE).'
    exit 0
}
$tenant = $env:AZURE_TENANT_ID
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Error ("The Azure CLI (az) is needed to subscribe the app to the export account's events, and is not " +
        "installed: install it (https://aka.ms/installazurecli), run 'az login --tenant $tenant', then " +
        "'azd hooks run postdeploy'.")
    exit 1
}
$signedIn = az account show --query tenantId -o tsv 2>$null
if (-not $signedIn) {
    Write-Error "The Azure CLI is not signed in: run 'az login --tenant $tenant', then 'azd hooks run postdeploy'."
    exit 1
}
if ($signedIn -ne $tenant) {
    Write-Error ("The Azure CLI is signed in to tenant $signedIn, azd deployed to ${tenant}: run " +
        "'az login --tenant $tenant', then 'azd hooks run postdeploy'.")
    exit 1
}

$parts = $accountId.Split('/')
$subscription, $accountGroup, $account = $parts[2], $parts[4], $parts[8]
# An account has at most one system topic, in any group of its subscription: use it as it is, where it is. -ieq
# compares resource ids without case (Azure writes group names in either case).
$topics = az eventgrid system-topic list --subscription $subscription --query '[].{id: id, source: source}' -o json |
    ConvertFrom-Json
if ($LASTEXITCODE -ne 0) { exit 1 }
$found = $topics | Where-Object { $_.source -ieq $accountId } | Select-Object -First 1
if ($found) {
    $topic, $group, $create = $found.id.Split('/')[8], $found.id.Split('/')[4], 'false'
} else {
    $topic, $group, $create = "$account-events", $accountGroup, 'true'
}
Write-Host "Subscribing $env:AZURE_FUNCTION_NAME to model.json writes in $account (Event Grid system topic $topic in $group)"
# A fresh app may not answer Event Grid's validation yet (its keys listed, its host cold): try again a few times.
$attempts = if ($env:EVENTS_DEPLOY_ATTEMPTS) { [int]$env:EVENTS_DEPLOY_ATTEMPTS } else { 5 }
$pause = if ($env:EVENTS_RETRY_SECONDS) { [int]$env:EVENTS_RETRY_SECONDS } else { 30 }
for ($attempt = 1; ; $attempt++) {
    az deployment group create --subscription $subscription --resource-group $group `
        --name "$env:AZURE_FUNCTION_NAME-events" --template-file infra/app/events.bicep --output none `
        --parameters exportStorageAccountId="$accountId" topicName="$topic" createTopic="$create" `
        functionAppName="$env:AZURE_FUNCTION_NAME" functionAppResourceGroup="$env:AZURE_RESOURCE_GROUP" `
        functionAppSubscriptionId="$env:AZURE_SUBSCRIPTION_ID"
    if ($LASTEXITCODE -eq 0) { break }
    if ($attempt -ge $attempts) {
        Write-Error "The Event Grid subscription failed $attempt times: see the error above, then 'azd hooks run postdeploy'."
        exit 1
    }
    Write-Host "The Event Grid subscription failed (attempt $attempt); trying again in $($attempt * $pause) s."
    Start-Sleep -Seconds ($attempt * $pause)
}
